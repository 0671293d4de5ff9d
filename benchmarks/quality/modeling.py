"""Model plumbing shared by fine-tuning and evaluation: one naming, one pooling, one head format.

Every checkpoint of the benchmark (the base and each task model) is written by
:func:`save_hf_dir` from a ``transformers.BertModel`` state dict, so all of them carry exactly the
same 103 tensor names (``embeddings.*``, ``encoder.layer.{i}.*``, ``pooler.dense.*``). The shipped
all-MiniLM-L6-v2 file also holds the int64 ``embeddings.position_ids`` buffer, which BertModel no
longer saves; re-saving the base the same way as the fine-tunes keeps the key sets identical, which
the merge requires.

A task's classifier is a linear head on the attention-masked mean of the last hidden states (the
sentence-transformers pooling of this model). The head is stored next to the encoder as
``head.safetensors`` (``weight`` [C, 384], ``bias`` [C], label names in the metadata).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
MAX_LEN = 64


@dataclass
class Head:
    """A linear classifier on pooled features."""

    weight: torch.Tensor  # [C, H]
    bias: torch.Tensor  # [C]
    labels: list[str]

    def save(self, path: Path) -> None:
        save_file(
            {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()},
            str(path),
            metadata={"labels": json.dumps(self.labels)},
        )

    @classmethod
    def load(cls, path: Path) -> Head:
        with safe_open(str(path), "pt") as fh:
            labels = json.loads(fh.metadata()["labels"])
        t = load_file(str(path))
        return cls(t["weight"], t["bias"], labels)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.T + self.bias


def load_tokenizer(model_dir: Path):  # -> transformers.PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def tokenize(tokenizer, texts: Sequence[str], max_len: int = MAX_LEN) -> list[list[int]]:
    """Token ids without padding, truncated to ``max_len``; batches are padded on the fly."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    return [list(x) for x in enc["input_ids"]]


def collate(ids: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest member: (input_ids, attention_mask)."""
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return inp, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def encode(model, inp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pooled sentence features of one padded batch (token_type_ids all zero)."""
    out = model(input_ids=inp, attention_mask=mask, token_type_ids=torch.zeros_like(inp))
    return mean_pool(out.last_hidden_state, mask)


@torch.no_grad()
def features(model, ids: Sequence[list[int]], batch_size: int = 128) -> torch.Tensor:
    """Pooled features for many examples, in input order.

    Examples are batched by length (longest first) so that short-text tasks pad little; on two
    CPU cores this roughly halves evaluation time for tweets, quotes and glosses.
    """
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = torch.empty((len(ids), model.config.hidden_size))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        inp, mask = collate([ids[i] for i in idx])
        out[idx] = encode(model, inp, mask).float()
    return out


def accuracy(model, head: Head, ids: Sequence[list[int]], labels: Sequence[int]) -> float:
    """Top-1 accuracy (in %) of encoder + head on tokenized examples."""
    if not ids:
        return float("nan")
    pred = head.logits(features(model, ids)).argmax(-1)
    return 100.0 * (pred == torch.tensor(list(labels))).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _quiet_transformers() -> None:
    """No "Loading weights" progress bars in the benchmark's logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def bert_from_dir(model_dir: Path):
    """A BertModel loaded from an HF directory (config.json + model.safetensors)."""
    from transformers import BertModel

    _quiet_transformers()

    return BertModel.from_pretrained(str(model_dir))


def bert_from_state(config_dir: Path, state: dict[str, torch.Tensor]):
    """A BertModel with the given state dict; every tensor must be there (strict)."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig.from_pretrained(str(config_dir)))
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in state.items() if k != "embeddings.position_ids"}, strict=False
    )
    missing = [k for k in missing if k != "embeddings.position_ids"]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model.eval()


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: a single model.safetensors or shards + index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(model_dir / f)))
    return state


def save_hf_dir(model, out_dir: Path, base_dir: Path, extra: dict | None = None) -> None:
    """Write ``model`` as an HF directory with the base's config and tokenizer files.

    Written to a sibling temp directory and renamed, so a cached model is either complete or
    absent (an interrupted fine-tune never leaves a half-written checkpoint behind).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", *TOKENIZER_FILES):
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copy2(src, tmp / name)
    for name, obj in (extra or {}).items():
        if isinstance(obj, Head):
            obj.save(tmp / name)
        else:
            (tmp / name).write_text(json.dumps(obj, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def prepare_base(shipped_dir: Path, out_dir: Path) -> Path:
    """The base model re-saved under the benchmark's tensor naming (see module docstring)."""
    out_dir = Path(out_dir)
    if not (out_dir / "model.safetensors").is_file():
        save_hf_dir(bert_from_dir(shipped_dir), out_dir, shipped_dir)
    return out_dir
