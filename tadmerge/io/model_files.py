"""The files beside an output's weights: the base's side files, config.json made to
agree with the weights, and a README.md model card.

- A merge's config.json is the base's, byte for byte, except when the base's head
  is tied (tie_word_embeddings: true, no lm_head.weight) and the output stores a
  head (some fine-tune is untied): then tie_word_embeddings is false in it, or
  loaders would tie the head to the embedding and drop the merged head.
- An EMR output is not a model (its shards hold τ_uni, not weights): the base's
  config.json is kept as ``base_config.json``, and its config.json names the model
  type ``tadmerge-emr`` (EMR_CONFIG), which no loader knows: transformers'
  ``from_pretrained`` fails naming it instead of loading meaningless weights.
  `tadmerge materialize` writes a task model with the base's config.json.
- README.md: YAML front matter (base_model: the base and the models merged,
  base_model_relation: merge, tags, library_name where the base's config names
  one) and a body with the method, its parameters, the drop rates and the config.
"""

from __future__ import annotations

import json
import math
import os

from .checkpoint import config_json

CARD_NAME = "README.md"
REPORT_NAME = "merge_report.json"  # what the output is made from, and its figures
CONFIG_NAME = "merge_config.yaml"  # the config it was merged with, as parsed
EMR_NAME = "emr.json"  # an EMR output's rescalers, pinned base and layout
BASE_CONFIG_NAME = "base_config.json"  # an EMR output's copy of the base's config.json
EMR_MODEL_TYPE = "tadmerge-emr"
EMR_CONFIG = (
    json.dumps(
        {
            "model_type": EMR_MODEL_TYPE,
            "tadmerge": "an EMR output, not a model: its weights are the unified task vector. "
            "Write task NAME as a model with `tadmerge materialize <this folder> --task NAME "
            "--to <folder>`; the base's config is base_config.json",
        },
        indent=2,
    )
    + "\n"
).encode("utf-8")


def side_files(plan) -> list[tuple[str, str | bytes]]:
    """(file name in the output, the source path to copy or the bytes to write) for
    each side file of the base (io/checkpoint.EXTRA_FILE_NAMES), config.json made
    to agree with the output (see the module's docstring)."""
    base = plan.inputs[0]
    vocab = base.vocabulary  # tokenizer: union | <model> (planners/vocabulary.py)
    out: list[tuple[str, str | bytes]] = []
    for src in base.extra_files:
        name = os.path.basename(src)
        if vocab is not None and name in vocab.tokenizer_files:
            continue  # (the output's tokenizer's files instead, below)
        if name != "config.json":
            out.append((name, src))
        elif plan.is_emr:
            out.append((BASE_CONFIG_NAME, src))
            out.append((name, EMR_CONFIG))
        elif getattr(plan, "layer_map", None) is not None:
            out.append((name, stacked_config(plan) or src))
        else:
            out.append((name, _untied_config(plan, base) or src))
    if vocab is not None:
        out.extend(vocab.files)
    return out


def _untied_config(plan, base) -> bytes | None:
    """The base's config.json with tie_word_embeddings: false when the output stores
    a head the base only has tied, and vocab_size the output's vocabulary rows
    (tokenizer: union | <model>) where they differ; None to copy it unchanged."""
    untie = False
    for head, _ in base.aliases:
        t = plan.find_tensor(head)
        untie = untie or (t is not None and t.out_dtype is not None)
    vocab = base.vocabulary
    doc = config_json(base)
    rows = None
    if vocab is not None and doc is not None:
        holder = doc if "vocab_size" in doc else doc.get("text_config")
        if isinstance(holder, dict) and holder.get("vocab_size") != vocab.rows:
            holder["vocab_size"] = rows = vocab.rows
    if not untie and rows is None:
        return None
    if doc is None:
        return None
    if untie:
        doc["tie_word_embeddings"] = False
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def untied_config(ck) -> bytes | None:
    """`ck`'s config.json with tie_word_embeddings: false (None: it has none)."""
    doc = config_json(ck)
    if doc is None:
        return None
    doc["tie_word_embeddings"] = False
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


# the config keys of the layer count (Llama, Mistral, Qwen, Gemma...; GPT-2; others)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def stacked_config(plan) -> bytes | None:
    """The base's config.json for a stacked output (slices, planners/slices.py): its
    layer count is the output's, and each list of one value per layer (a key naming
    layers, e.g. `layer_types`, as long as the base's layer count) is rebuilt from
    the config of the input each output layer came from. Untied as _untied_config
    says. None: the base has no config.json."""
    doc = config_json(plan.inputs[0])
    if doc is None:
        return None
    if _untied_config(plan, plan.inputs[0]) is not None:
        doc["tie_word_embeddings"] = False
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(doc.get(k), int)), None)
    count = doc.get(key) if key else None
    docs = [config_json(ck) or {} for ck in plan.inputs]
    for name, value in list(doc.items()):
        if "layer" not in name or not isinstance(value, list) or len(value) != count:
            continue
        lists = [d.get(name) if isinstance(d.get(name), list) else value for d in docs]
        doc[name] = [
            lists[i][layer] if layer < len(lists[i]) else value[min(layer, len(value) - 1)]
            for i, layer in plan.layer_map
        ]
    if key is not None:
        doc[key] = len(plan.layer_map)
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------
# the model card
# ------------------------------------------------------------------------------------


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a YAML scalar


def _model_id(source: str) -> str:
    """A hub id without its @revision (the hub's base_model takes ids); a path as given."""
    from .checkpoint import _parse_repo_id

    if os.path.exists(os.path.expanduser(source)):
        return source
    repo = _parse_repo_id(source)
    return repo[0] if repo is not None else source


def drop_rates(report: dict, tasks: list[str]) -> dict[str, dict]:
    """Per task, over the merged tensors: the share of τ dropped (element-weighted)
    and the smallest and largest tensor's drop rate. One pass over the tensors,
    holding sums only (the report's tensors may be made one by one: a million)."""
    n = dict.fromkeys(tasks, 0)
    kept = dict.fromkeys(tasks, 0)
    low: dict = dict.fromkeys(tasks)
    high: dict = dict.fromkeys(tasks)
    for entry in (report.get("tensors") or {}).values():
        figs = entry.get("tasks") or {}
        for task in tasks:
            fig = figs.get(task)
            if not fig:
                continue
            n[task] += fig["n"]
            kept[task] += fig["kept"]
            rate = fig.get("drop_rate")
            if rate is not None:  # (min() and max() by the same comparisons)
                if low[task] is None or rate < low[task]:
                    low[task] = rate
                if high[task] is None or rate > high[task]:
                    high[task] = rate
    return {
        task: {
            "drop_rate": 1.0 - kept[task] / n[task],
            "min": low[task],
            "max": high[task],
            "elements": n[task],
        }
        for task in tasks
        if n[task]
    }


def model_card(plan, report: dict) -> bytes:
    """README.md of a merge output."""
    cfg = plan.config
    base_doc = config_json(plan.inputs[0]) or {}
    library = base_doc.get("library_name")
    if not isinstance(library, str) or not library:
        library = "transformers" if "transformers_version" in base_doc else None
    front = ["---", "base_model:", f"- {_yaml_str(_model_id(cfg.base))}"]
    front += [f"- {_yaml_str(_model_id(m.path))}" for m in cfg.models]
    front += ["base_model_relation: merge", "tags:", "- merge", "- tadmerge"]
    if plan.is_emr:
        front.append("- emr")
    if library:
        front.append(f"library_name: {_yaml_str(library)}")
    front.append("---")

    method = cfg.merge.method
    sp = cfg.sparsify
    body = [
        "",
        f"# {os.path.basename(os.path.normpath(cfg.output.path))}",
        "",
        f"A merge of {len(cfg.models)} model(s) into `{cfg.base}`, made with "
        f"tadmerge {report.get('tadmerge_version', '')}.",
    ]
    if plan.is_emr:
        body += [
            "",
            "**This is an EMR output, not a model.** Its `model.safetensors` holds the unified "
            "task vector τ_uni, not weights, and its `config.json` names the model type "
            f"`{EMR_MODEL_TYPE}` (the base's config is `{BASE_CONFIG_NAME}`), so it does not "
            "load as a model. Write task `NAME` as a "
            "model with `tadmerge materialize <this folder> --task NAME --to <folder>`, or "
            "load it in memory with `tadmerge.emr.task_state_dict(<this folder>, 'NAME')`.",
        ]
    body += ["", "## Method", "", f"- merge: `{method}`"]
    params = {k: v for k, v in cfg.to_dict().get("merge", {}).items() if k != "method"}
    for k, v in params.items():
        body.append(f"  - {k}: `{v}`")
    body.append(f"- sparsify: `{sp.method}`")
    for k, v in (cfg.to_dict().get("sparsify") or {}).items():
        if k != "method":
            body.append(f"  - {k}: `{v}`")
    body += ["", "## Models", "", "| name | source | weight |", "|---|---|---|"]
    body += [f"| {m.name} | `{m.path}` | {m.weight} |" for m in cfg.models]
    rates = drop_rates(report, cfg.task_names)
    if rates and sp.method != "none":
        body += [
            "",
            "## Drop rates",
            "",
            "Share of each task vector dropped over the merged tensors (and the lowest and "
            "highest tensor's share); per tensor in `merge_report.json`.",
            "",
            "| task | dropped | lowest tensor | highest tensor |",
            "|---|---|---|---|",
        ]
        for task, r in rates.items():
            body.append(
                f"| {task} | {_pct(r['drop_rate'])} | {_pct(r['min'])} | {_pct(r['max'])} |"
            )
    casts = report.get("casts")
    if casts:
        body += ["", "## Inputs in another dtype than the base's", ""]
        for name, groups in casts.items():
            what = ", ".join(f"{g['tensors']} tensors {g['from']} → {g['to']}" for g in groups)
            body.append(f"- {name}: {what}")
    vocab = (report.get("vocabulary") or {}).get("dropped")
    if vocab:
        body += ["", "## Added tokens", "", "Merged on the base's vocabulary; dropped:", ""]
        for name, rows in vocab.items():
            what = ", ".join(f"{r['tensor']} rows {r['rows_merged']}..{r['rows']}" for r in rows)
            body.append(f"- {name}: {what}")
    body += ["", "## Configuration", "", "```yaml", cfg.to_yaml().rstrip("\n"), "```", ""]
    return ("\n".join(front + body)).encode("utf-8")


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:.2f}%"
