"""The output's vocabulary from the tokenizers (`tokenizer: {source: union | <model>}`):
real transformers models with their own tokenizers (a tiny WordLevel one, built
here) and added tokens; the output loads with AutoModelForCausalLM and
AutoTokenizer, and its rows, token by token, equal an in-memory reference
(tests/reference.vocab_rows, then the merge of the aligned rows), whole and split."""

from __future__ import annotations

import json
import os

import pytest
import reference as R
import torch
from checkpoints import TINY_LM_SIZES
from safetensors.torch import load_file
from test_merge_exact import SPARSIFIERS

from tadmerge.config import parse_config
from tadmerge.errors import ConfigError, InputError
from tadmerge.io import publish
from tadmerge.run.driver import run_merge

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def words(n: int) -> list[str]:
    return ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n - 3)]


def write_tokenizer(path, vocab: list[str], added=()) -> None:
    """A WordLevel tokenizer of `vocab` (ids in order), then `added` tokens."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_tokens(list(added))
    fast.save_pretrained(str(path))


def build(path, arch, tied, seed, rows, vocab, added=(), like=None, dtype=torch.bfloat16):
    """A model saved by transformers with `rows` vocabulary rows and its tokenizer;
    `like`: a base's state dict, moved a little (its rows first, new rows fresh)."""
    cfg = CONFIGS[arch](**{**TINY_LM_SIZES, "vocab_size": rows}, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if like is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                src = like.get(n, like.get(EMBED)).float()
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
                if p.dim() == 2 and p.shape[0] != src.shape[0]:  # (vocabulary rows)
                    m = min(p.shape[0], src.shape[0])
                    p[:m] += src[:m]
                    p[m:] += torch.randn(p[m:].shape, generator=g)
                else:
                    p += src
    model.to(dtype).save_pretrained(str(path))
    write_tokenizer(path, vocab, added)
    return str(path)


def state(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def merge(tmp_path, base, paths, out, source="union", split=False, **extra):
    raw = {
        "base": base,
        "models": [
            {"path": p, "name": f"m{i}", "weight": (1.0, 0.5, 2.0)[i]} for i, p in enumerate(paths)
        ],
        "output": {"path": str(tmp_path / out)},
        "runtime": {"progress": "none"},
        "tokenizer": {"source": source},
        "seed": 7,
        **extra,
    }
    if split:  # vocabulary tensors in row blocks of 4 rows, two workers
        raw["runtime"].update(
            block_elements=128, max_unit_elements=128, workers=2, memory_budget="256MB"
        )
    return run_merge(parse_config(raw))


def expected(base, paths, out, sp, method, scale=1.0, ws=(1.0, 0.5, 2.0)):
    """The merge in memory: every vocabulary tensor aligned token by token on the
    output's tokenizer (read from the output: the ids), then merged whole."""
    sds = [state(p) for p in [base, *paths]]
    toks = [AutoTokenizer.from_pretrained(p).get_vocab() for p in [base, *paths]]
    out_vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    tied = HEAD not in sds[0]
    rows_out = max(max(out_vocab.values()) + 1, sds[0][EMBED].shape[0])
    by_row = {i: t for t, i in out_vocab.items()}
    # a row no token names: the base's own row (padding), a pseudo-token of its own
    order = [by_row.get(r, f"\0pad{r}") for r in range(rows_out)]
    result = {}
    for n in sds[0]:
        if n in (EMBED, HEAD):
            per_input = []
            for i, (sd, vocab) in enumerate(zip(sds, toks, strict=True)):
                w = sd.get(n, sd[EMBED])
                rows = {t: w[j] for t, j in vocab.items() if j < w.shape[0]}
                if i == 0:
                    rows.update({f"\0pad{r}": w[r] for r in range(w.shape[0]) if r not in by_row})
                per_input.append(rows)
            aligned = R.vocab_rows(per_input, order)
        else:
            aligned = [sd.get(n, sd.get(EMBED)).float() for sd in sds]
        b, thetas = aligned[0], aligned[1:]
        taus = [t - b for t in thetas]
        ts = [R.sparsify(t, sp, task=k, name=n, seed=7, block_rows=1) for k, t in enumerate(taus)]
        merged = R.combine(method, b, thetas, ts, list(ws[: len(thetas)]), scale, "mean")
        result[n] = merged.to(sds[0][n].dtype)
    assert tied == (HEAD not in result)
    return result


def check_output(out: str, exp: dict[str, torch.Tensor], rows: int, tied: bool) -> None:
    got = state(out)
    assert set(got) == set(exp)
    for n, v in exp.items():
        assert got[n].dtype == v.dtype and torch.equal(got[n], v), n
    doc = json.load(open(os.path.join(out, "config.json")))
    assert doc["vocab_size"] == rows == got[EMBED].shape[0]
    assert doc["tie_word_embeddings"] is tied
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.state_dict())
    params[HEAD] = model.get_output_embeddings().weight
    for n, v in exp.items():
        assert torch.equal(params[n].detach().to(v.dtype), v), n
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert publish.verify_output(out) == []


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """An untied Llama base (64 tokens, 64 rows); m0 adds 3 tokens (one shared with
    m1, the others its own), m1 adds 2 (a special one)."""
    root = tmp_path_factory.mktemp("llama")
    v = words(64)
    base = build(root / "base", "llama", False, 0, 64, v)
    sd = state(base)
    a = [AddedToken("<tool>", special=False), AddedToken("<shared>"), AddedToken("<a3>")]
    b = [AddedToken("<shared>"), AddedToken("<|im_end|>", special=True)]
    m0 = build(root / "m0", "llama", False, 1, 67, v, a, sd)
    m1 = build(root / "m1", "llama", False, 2, 66, v, b, sd)
    return root, base, [m0, m1]


@pytest.mark.parametrize("split", [False, True])
def test_union_llama_added_tokens(tmp_path, llama, split):
    """Union: the base's 64 tokens keep their ids, then m0's 3 and m1's 1 new one;
    TADrop + TIES on the aligned rows (exact per-tensor statistics over the rows
    as merged) equal the reference whole and split, and the output loads."""
    _, base, paths = llama
    sp = SPARSIFIERS["tadrop"]
    ties = {"method": "ties", "scale": 0.7}
    res = merge(tmp_path, base, paths, "out", split=split, sparsify=sp, merge=ties)
    out = res.output
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    base_vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    assert all(vocab[t] == i for t, i in base_vocab.items())
    assert [vocab[t] for t in ("<tool>", "<shared>", "<a3>", "<|im_end|>")] == [64, 65, 66, 67]
    assert len(tok) == 68
    # the token string -> row: encoding text with added tokens gives their rows
    assert tok("w1 <shared> <|im_end|>")["input_ids"] == [vocab["w1"], 65, 67]
    assert tok.added_tokens_decoder[67].special  # (m1's settings kept)
    assert not tok.added_tokens_decoder[64].special
    exp = expected(base, paths, out, sp, "ties", 0.7)
    check_output(out, exp, 68, tied=False)
    # a token only m0 has is m0's row exactly (τ = 0 for every model there)
    m0 = state(paths[0])
    assert torch.equal(state(out)[EMBED][64], m0[EMBED][64])
    rep = res.report["vocabulary"]
    assert rep["source"] == "union" and rep["rows"] == 68 and rep["base_rows"] == 64
    assert rep["models"]["m0"] == {"tokens": 67, "beyond_base": 3, "lacking": 1}
    assert rep["models"]["m1"] == {"tokens": 66, "beyond_base": 2, "lacking": 2}


def test_union_whole_and_split_give_the_same_bytes(tmp_path, llama):
    _, base, paths = llama
    a = merge(tmp_path, base, paths, "a", merge={"method": "task_arithmetic"})
    b = merge(tmp_path, base, paths, "b", split=True, merge={"method": "task_arithmetic"})
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (
            open(os.path.join(a.output, f), "rb").read()
            == open(os.path.join(b.output, f), "rb").read()
        ), f


def test_source_model_takes_its_tokenizer(tmp_path, llama):
    """source: m1: the output's vocabulary is m1's (66 rows); m0's tokens m1 lacks
    are dropped, the base's rows of m1's added tokens filled from m1."""
    _, base, paths = llama
    res = merge(tmp_path, base, paths, "out", source="m1", merge={"method": "task_arithmetic"})
    vocab = AutoTokenizer.from_pretrained(res.output).get_vocab()
    assert vocab == AutoTokenizer.from_pretrained(paths[1]).get_vocab()
    exp = expected(base, paths, res.output, SPARSIFIERS["none"], "task_arithmetic")
    check_output(res.output, exp, 66, tied=False)


def test_qwen2_tied_with_padding_rows(tmp_path):
    """A tied Qwen2 whose 64 rows hold 59 tokens (58 of its tokenizer file, and
    <|endoftext|>, which transformers' Qwen2 tokenizer adds when it loads): the
    fine-tunes' added tokens take ids inside their own padding rows; the union's
    are 59, 60, 61 and rows 62, 63 stay the base's (padding). Task arithmetic,
    whole and split."""
    v = words(58)
    base = build(tmp_path / "base", "qwen2", True, 0, 64, v)
    sd = state(base)
    m0 = build(tmp_path / "m0", "qwen2", True, 1, 64, v, [AddedToken("<a>"), AddedToken("<b>")], sd)
    m1 = build(tmp_path / "m1", "qwen2", True, 2, 64, v, [AddedToken("<c>")], sd)
    assert len(AutoTokenizer.from_pretrained(base)) == 59
    c = AutoTokenizer.from_pretrained(m1).get_vocab()["<c>"]
    for split in (False, True):
        res = merge(tmp_path, base, [m0, m1], f"out{split}", split=split,
                    merge={"method": "task_arithmetic", "scale": 0.8})  # fmt: skip
        vocab = AutoTokenizer.from_pretrained(res.output).get_vocab()
        assert [vocab[t] for t in ("<a>", "<b>", "<c>")] == [59, 60, 61]
        assert len(vocab) == 62
        exp = expected(base, [m0, m1], res.output, SPARSIFIERS["none"], "task_arithmetic", 0.8)
        assert HEAD not in exp
        check_output(res.output, exp, 64, tied=True)
        # row 61 is <c>: m1's own row of it; rows 62, 63: the base's padding rows
        got = state(res.output)[EMBED]
        assert torch.equal(got[61], state(m1)[EMBED][c])
        assert torch.equal(got[62:], sd[EMBED][62:])


def test_a_model_without_tokenizer_files_is_named(tmp_path, llama):
    _, base, paths = llama
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("model.safetensors", "config.json"):
        (bare / f).write_bytes(open(os.path.join(paths[0], f), "rb").read())
    with pytest.raises(InputError, match=r"model 'm1' has no tokenizer files"):
        merge(tmp_path, base, [paths[1], str(bare)], "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_is_checked(tmp_path, llama):
    _, base, paths = llama
    with pytest.raises(ConfigError, match=r"tokenizer.source: expected base, union or a model"):
        merge(tmp_path, base, paths, "out", source="nope")
    with pytest.raises(ConfigError, match=r"tokenizer.source: union is not supported with"):
        merge(tmp_path, base, paths, "out", merge={"method": "emr"})
    with pytest.raises(ConfigError, match=r"exclude pattern .* matches lm_head.weight"):
        merge(tmp_path, base, paths, "out", exclude=["lm_head"])


@pytest.mark.external
def test_mergekit_union_agrees_token_by_token(tmp_path):
    """The same mergekit YAML (tokenizer_source: union, task_arithmetic, float32
    models) run by mergekit and by tadmerge (translated): the same vocabulary, and
    every token's embedding and head rows agree, filled rows included (mergekit's
    defaults are this fill: the base's row, a lone model's row, or the mean)."""
    import subprocess
    import sys

    import yaml

    sys.path.insert(0, str(REPO))
    from benchmarks.common import tool_missing, tool_python

    missing = tool_missing("mergekit", "tests/test_vocabulary.py")
    if missing is not None:
        pytest.skip(missing)
    v = words(64)
    base = build(tmp_path / "base", "llama", False, 0, 64, v, dtype=torch.float32)
    sd = state(base)
    a = [AddedToken("<tool>"), AddedToken("<shared>")]
    b = [AddedToken("<shared>"), AddedToken("<|im_end|>", special=True)]
    m0 = build(tmp_path / "m0", "llama", False, 1, 66, v, a, sd, dtype=torch.float32)
    m1 = build(tmp_path / "m1", "llama", False, 2, 66, v, b, sd, dtype=torch.float32)
    mk = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": m0, "parameters": {"weight": 1.0}},
            {"model": m1, "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 0.8},
        "dtype": "float32",
        "tokenizer_source": "union",
    }
    cfg = tmp_path / "mk.yml"
    cfg.write_text(yaml.safe_dump(mk))
    outs = {"td": tmp_path / "td", "mk": tmp_path / "mk"}
    runs = [
        [sys.executable, "-m", "tadmerge.cli", "-q", "merge", str(cfg), "--out", str(outs["td"])],
        [str(tool_python("mergekit")), "-m", "mergekit.scripts.run_yaml", str(cfg),
         str(outs["mk"]), "--no-write-model-card", "--quiet"],
    ]  # fmt: skip
    for cmd in runs:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd[:4]}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    vocab = {k: AutoTokenizer.from_pretrained(str(d)).get_vocab() for k, d in outs.items()}
    assert set(vocab["td"]) == set(vocab["mk"]) == set(v) | {"<tool>", "<shared>", "<|im_end|>"}
    got = {k: _all_tensors(str(d)) for k, d in outs.items()}
    for n in (EMBED, HEAD):
        for t, i in vocab["td"].items():
            j = vocab["mk"][t]
            torch.testing.assert_close(got["td"][n][i], got["mk"][n][j], rtol=1e-6, atol=1e-7)
    for n, x in got["td"].items():
        if n not in (EMBED, HEAD):
            torch.testing.assert_close(x, got["mk"][n], rtol=1e-6, atol=1e-7, msg=n)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _all_tensors(d: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def test_a_changed_tokenizer_changes_the_plan(tmp_path, llama):
    """The row maps and tokenizer files are in the plan's fingerprint (--resume
    refuses a model whose tokenizer changed); the plan travels pickled (Ray)."""
    import pickle
    import shutil

    from tadmerge.planners.plan import make_plan

    _, base, paths = llama
    m1 = str(tmp_path / "m1")
    shutil.copytree(paths[1], m1)

    def plan():
        raw = {
            "base": base,
            "models": [{"path": paths[0], "name": "m0"}, {"path": m1, "name": "m1"}],
            "output": {"path": str(tmp_path / "out")},
            "tokenizer": {"source": "union"},
        }
        return make_plan(parse_config(raw))

    first = plan()
    again = pickle.loads(pickle.dumps(first))
    assert again.fingerprint == first.fingerprint
    t = next(t for t in again.tensors if t.name == EMBED)
    assert t.shape == (68, TINY_LM_SIZES["hidden_size"]) and t.dtype == "BF16"
    # m1's tokenizer swaps two tokens' ids: the same shapes, other row maps
    doc = json.load(open(os.path.join(m1, "tokenizer.json")))
    v = doc["model"]["vocab"]
    v["w5"], v["w6"] = v["w6"], v["w5"]
    json.dump(doc, open(os.path.join(m1, "tokenizer.json"), "w"))
    changed = plan()
    assert [t.shape for t in changed.tensors] == [t.shape for t in first.tensors]
    assert changed.fingerprint != first.fingerprint


@pytest.mark.parametrize("source", ["base", "union"])
def test_tokenizer_source_naming_a_model_and_a_keyword_is_refused(tmp_path, source):
    """A model named 'base' or 'union' made `tokenizer.source: base|union` mean the
    keyword silently, whatever the user meant (the model's tokenizer): the merge ran
    with another vocabulary, exit 0. Ambiguous: refused naming the model."""
    raw = {
        "base": str(tmp_path),
        "models": [{"path": str(tmp_path), "name": source}, {"path": str(tmp_path), "name": "b"}],
        "output": {"path": str(tmp_path / "out")},
        "tokenizer": {"source": source},
    }
    with pytest.raises(ConfigError, match=rf"tokenizer.source: {source} .*models\[0\].name"):
        parse_config(raw)
    raw["tokenizer"]["source"] = "b"
    parse_config(raw)  # (another model's tokenizer: unambiguous)
