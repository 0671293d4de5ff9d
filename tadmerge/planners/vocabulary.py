"""The output's vocabulary when it is not the base's (`tokenizer: union | <model>`).

Built from the inputs' tokenizer files (transformers' AutoTokenizer: get_vocab,
added_tokens_decoder, add_tokens, save_pretrained), before any tensor is read:
- `union`: the base's tokenizer, then, model by model in the config's order and
  each in its id order, every token of the model's vocabulary the output lacks
  (a model's added token keeps its settings: special, strip, normalized);
- a model's name: that model's tokenizer.
Every input's vocabulary is its tokenizer's tokens with an id below its rows
(the embedding's rows, or config.json's vocab_size when smaller: padding).

The output has max(its vocabulary's size, the source's embedding rows) rows
(the source: the base for union); a row no token names is the source's own row
of that index (padding). Each input gets a row map (output row -> its own row,
or -1), and each of its vocabulary tensors (those of the base's tensors whose
name is an embedding's or a head's and whose rows are the base's vocabulary
rows) is read through it (io/vocab_rows.VocabEntry); an input whose map is the
identity on as many rows keeps its tensors as they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace

import numpy as np

from ..config import MergeConfig
from ..errors import InputProblem
from ..io.checkpoint import EMBED_SUFFIXES, TOKENIZER_FILES, Checkpoint, config_json
from ..io.vocab_rows import RowMaps, VocabEntry

log = logging.getLogger("tadmerge")

_TOKENIZER_MARKS = TOKENIZER_FILES - {"special_tokens_map.json", "added_tokens.json"}


@dataclass(frozen=True)
class Vocabulary:
    """The output's vocabulary: what the output writes besides the merged rows."""

    source: str  # union | a model's name
    rows: int  # the output's vocabulary rows (config.json vocab_size)
    base_rows: int
    tensors: tuple[str, ...]  # the vocabulary tensors
    files: tuple[tuple[str, bytes], ...]  # the output's tokenizer files
    # per model: output tokens it has that the base lacks, and output tokens it lacks
    models: dict[str, dict] = field(default_factory=dict)
    digest: str = ""  # of the row maps and the files (the plan's fingerprint)

    @property
    def tokenizer_files(self) -> frozenset[str]:
        """The base's side files the output does not copy: its tokenizer's."""
        return TOKENIZER_FILES | {name for name, _ in self.files}

    def report(self) -> dict:
        return {
            "source": self.source,
            "rows": self.rows,
            "base_rows": self.base_rows,
            "tensors": list(self.tensors),
            "models": self.models,
        }


def on_output_vocab(
    cfg: MergeConfig, inputs: list[Checkpoint], problems: list[InputProblem]
) -> list[Checkpoint]:
    """`inputs` with their vocabulary tensors on the output's vocabulary and the
    base carrying the Vocabulary (Checkpoint.vocabulary); problems recorded
    (inputs unchanged) where a tokenizer or an embedding is missing."""
    source = cfg.tokenizer.source
    labels = ["the base"] + [f"model '{m.name}'" for m in cfg.models]
    toks, limits, rows_of = [], [], []
    for ck, label in zip(inputs, labels, strict=True):
        rows = _embedding_rows(ck, label, problems)
        tok = _tokenizer(ck, label, source, problems)
        toks.append(tok)
        rows_of.append(rows)
        doc = config_json(ck) or {}
        size = doc.get("vocab_size")
        limit = rows if rows is not None else 0
        if isinstance(size, int) and not isinstance(size, bool) and 0 < size < limit:
            limit = size
        limits.append(limit)
    if any(t is None for t in toks) or any(r is None for r in rows_of):
        return inputs
    vocabs = [_vocab(t, limit) for t, limit in zip(toks, limits, strict=True)]
    if source == "union":
        src = 0
        out_tok = _fresh(inputs[0])
        _add_union(out_tok, toks[1:], vocabs[1:])
    else:
        src = 1 + [m.name for m in cfg.models].index(source)
        out_tok = _fresh(inputs[src])
    out_vocab = out_tok.get_vocab()
    rows = max(max(out_vocab.values(), default=-1) + 1, rows_of[src])
    named = np.zeros(rows, bool)
    named[list(out_vocab.values())] = True
    maps = []
    for i, vocab in enumerate(vocabs):
        m = np.full(rows, -1, np.int64)
        for token, oid in out_vocab.items():
            own = vocab.get(token)
            if own is not None:
                m[oid] = own
        if i == src:  # padding: the rows no token names are the source's own
            pad = np.flatnonzero(~named[: rows_of[src]])
            m[pad] = pad
        maps.append(m)
    names = _vocab_tensors(inputs[0], rows_of[0])
    files = _saved(out_tok)
    h = hashlib.sha256(f"{source}\0{rows}\0{','.join(names)}".encode())
    for m in maps:
        h.update(m.tobytes())
    for fname, data in files:
        h.update(fname.encode() + b"\0" + hashlib.sha256(data).digest())
    vocab = Vocabulary(
        source=source,
        rows=rows,
        base_rows=rows_of[0],
        tensors=tuple(names),
        files=files,
        models={
            m.name: {
                "tokens": int(np.count_nonzero(maps[k + 1] >= 0)),
                "beyond_base": int(np.count_nonzero((maps[k + 1] >= 0) & (maps[0] < 0))),
                "lacking": int(np.count_nonzero(named & (maps[k + 1] < 0))),
            }
            for k, m in enumerate(cfg.models)
        },
        digest=h.hexdigest(),
    )
    log.info(
        "vocabulary: tokenizer.source %s, %d rows (the base's: %d) in %s",
        source,
        rows,
        rows_of[0],
        ", ".join(names),
    )
    return _with_maps(inputs, names, maps, rows_of, vocab)


def _with_maps(
    inputs: list[Checkpoint], names: list[str], maps: list[np.ndarray], rows_of: list, vocab
) -> list[Checkpoint]:
    """Each input with its vocabulary tensors read through its map (VocabEntry);
    an input whose map is the identity on its own rows keeps them as they are."""
    maps_bytes = tuple(m.tobytes() for m in maps)
    rows = maps[0].size
    out = []
    for i, ck in enumerate(inputs):
        tensors = dict(ck.tensors)
        identity = rows == rows_of[i] and np.array_equal(maps[i], np.arange(rows))
        for n in names:
            e = ck.tensors.get(n)
            if e is None or identity or e.rows != rows_of[i]:
                continue  # (a missing or odd tensor: agreement_problems names it)
            rm = RowMaps(tuple(c.tensors.get(n, e) for c in inputs), maps_bytes)
            shape = (rows, *e.shape[1:])
            tensors[n] = VocabEntry(
                name=e.name,
                dtype="F32",
                shape=shape,
                file=e.file,
                offset=e.offset,
                nbytes=rows * e.row_numel * 4,
                identity=e.identity,
                rows_of=rm,
                input=i,
                stored_dtype=getattr(e, "stored_dtype", "") or e.dtype,
            )
        out.append(replace(ck, tensors=tensors, vocabulary=vocab if i == 0 else None))
    return out


def _embedding_rows(ck: Checkpoint, label: str, problems: list) -> int | None:
    """The rows of the input's token embedding (its one *embed_tokens.weight-like
    tensor); None (a problem recorded) when it has none or several."""
    aliased = {n for n, _ in ck.aliases}
    embeds = [n for n in ck.tensors if n.endswith(EMBED_SUFFIXES) and n not in aliased]
    if len(embeds) == 1 and ck.tensors[embeds[0]].shape:
        return ck.tensors[embeds[0]].rows
    problems.append(
        InputProblem(
            ck.root,
            None,
            f"{label}: {'no' if not embeds else 'more than one'} token embedding "
            f"(a tensor named *{', *'.join(EMBED_SUFFIXES)}): tokenizer.source needs one",
        )
    )
    return None


def _tokenizer(ck: Checkpoint, label: str, source: str, problems: list):
    """The input's tokenizer (AutoTokenizer), or None with a problem recorded."""
    have = {os.path.basename(f) for f in ck.extra_files}
    if not have & _TOKENIZER_MARKS:
        problems.append(
            InputProblem(
                ck.root,
                None,
                f"{label} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                f"tokenizer.model, vocab.json, ...): tokenizer.source {source} builds the "
                "output's vocabulary from every input's tokenizer",
            )
        )
        return None
    try:
        return _fresh(ck)
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
        problems.append(InputProblem(ck.root, None, f"{label}: its tokenizer does not load: {e}"))
        return None


def _fresh(ck: Checkpoint):
    """A new tokenizer instance from the checkpoint's files (no remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ck.root, trust_remote_code=False)


def _vocab(tok, limit: int) -> dict[str, int]:
    """The tokenizer's tokens with an id below `limit` (the input's vocabulary rows)."""
    return {t: i for t, i in tok.get_vocab().items() if 0 <= i < limit}


def _add_union(out_tok, toks: list, vocabs: list[dict[str, int]]) -> None:
    """Add to `out_tok` every token of each model it lacks, model by model in id
    order; a model's added token with its own settings (AddedToken)."""
    have = set(out_tok.get_vocab())
    new = []
    for tok, vocab in zip(toks, vocabs, strict=True):
        decoder = tok.added_tokens_decoder
        for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if token in have:
                continue
            have.add(token)
            info = decoder.get(i)
            new.append(info if info is not None and info.content == token else token)
    if new:
        out_tok.add_tokens(new)


def _saved(tok) -> tuple[tuple[str, bytes], ...]:
    """The tokenizer's files as save_pretrained writes them (name, bytes)."""
    with tempfile.TemporaryDirectory(prefix="tadmerge-tokenizer-") as d:
        tok.save_pretrained(d)
        out = []
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as fh:
                out.append((name, fh.read()))
    return tuple(out)


def _vocab_tensors(base: Checkpoint, rows: int) -> list[str]:
    """The base's vocabulary tensors: an embedding's or a head's name, `rows` rows."""
    from .inventory import _VOCAB_RE

    return sorted(
        n for n, e in base.tensors.items() if e.shape and e.rows == rows and _VOCAB_RE.search(n)
    )
