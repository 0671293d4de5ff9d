"""Every key the config parser accepts is in README's "Config reference", and nothing
there is a key the parser refuses.

The accepted keys are read from the parser itself: `_check_keys` is wrapped to record
the set each section allows while a config with every section is parsed. The methods'
parameters are the generated block between `<!-- methods:begin` and
`<!-- methods:end -->` (its freshness: test_methods_registry.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from tadmerge import config, methods

README = Path(__file__).resolve().parent.parent / "README.md"


def accepted_keys(monkeypatch) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    real = config._check_keys

    def record(section, allowed, where):
        seen[re.sub(r"\[\d+\]", "[]", where)] = set(allowed)
        return real(section, allowed, where)

    monkeypatch.setattr(config, "_check_keys", record)
    config.parse_config({"base": "b", "models": [{"path": "m"}]})
    return seen


def documented_keys() -> dict[str, set[str]]:
    """{section: keys} of the README's config reference block (top level: 'config')."""
    text = README.read_text()
    block = re.search(r"### Config reference\n+```yaml\n(.*?)```", text, re.S)
    assert block, "README has no ```yaml block under '### Config reference'"
    out: dict[str, set[str]] = {"config": set()}
    section = None
    for line in block.group(1).splitlines():
        code = line.split("#", 1)[0].rstrip()
        if not code:
            continue
        top = re.match(r"^(\w+):(.*)$", code)
        if top:
            section, rest = top.groups()
            out["config"].add(section)
            out.setdefault(section, set()).update(re.findall(r"[{,]\s*(\w+):", rest))
            continue
        item = re.match(r"^\s+- (.*)$", code)
        if item and section is not None:
            out.setdefault(f"{section}[]", set()).update(
                re.findall(r"[{,]\s*(\w+):", item.group(1))
            )
            continue
        nested = re.match(r"^\s+(\w+):", code)
        if nested and section is not None:
            out[section].add(nested.group(1))
    return {k: v for k, v in out.items() if v}


def test_every_accepted_config_key_is_documented(monkeypatch):
    accepted = accepted_keys(monkeypatch)
    assert set(accepted) >= {"config", "models[]", "sparsify", "merge", "output", "runtime",
                             "inputs", "emr"}  # fmt: skip
    documented = documented_keys()
    for section, keys in accepted.items():
        if section in ("sparsify", "merge"):  # the method's parameters: the block below
            keys = {"method"}
        missing = keys - documented.get(section, set())
        assert not missing, f"README's config reference lacks {section}: {sorted(missing)}"
        stale = documented.get(section, set()) - keys
        assert not stale, f"README documents {section} keys the parser refuses: {sorted(stale)}"


def test_every_method_parameter_is_documented():
    text = README.read_text()
    block = text[text.index("<!-- methods:begin") : text.index("<!-- methods:end -->")]
    for table in (methods.sparsifiers(), methods.combiners()):
        for name, m in table.items():
            row = re.search(rf"^\| `{re.escape(name)}` \|.*$", block, re.M)
            assert row, f"README's methods block has no row for {name}"
            for p in m.params:
                assert f"`{p.name}`:" in row.group(0), f"{name}.{p.name} not in README"
    # and every parameter the parser accepts belongs to a method
    assert set(config._SPARSIFY_PARAMS) == {
        p.name for m in methods.sparsifiers().values() for p in m.params
    }
    assert set(config._MERGE_PARAMS) == {
        p.name for m in methods.combiners().values() for p in m.params
    }
