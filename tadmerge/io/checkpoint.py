"""Open an input checkpoint (directory, single file or Hugging Face repo id) safely.

Everything about an input is untrusted: file names in the shard index, symlinks, the
headers, and pickled weights. :func:`open_checkpoint` resolves the source, validates
every path against the checkpoint root, reads every header (never the data) and cross
checks the index against the shards, then raises ONE :class:`InputError` with every
problem it found, so an unattended run's log lists all of them at once.

Pickled weights (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused unless the
caller opts in with ``allow_pickle=True``; even then they are loaded with
``torch.load(weights_only=True)`` (no arbitrary code) and converted once into a
safetensors file in a cache directory, keyed by the sha256 of the pickle files:
``$TADMERGE_CACHE_DIR`` or ``$XDG_CACHE_HOME/tadmerge`` or ``~/.cache/tadmerge``, then
``converted/<sha256>/model.safetensors``. The conversion is written in a temporary
sibling directory and renamed into place, so a crash never leaves a half file there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tadmerge.errors import InputError, InputProblem
from tadmerge.io.block_io import (
    OutputTensor,
    create_shard_files,
    layout_shards,
    sync_all,
    write_at,
)
from tadmerge.io.entries import as_table
from tadmerge.io.safetensors_format import (
    SafetensorsHeader,
    TensorEntry,
    _DuplicateKeys,
    _no_duplicates,
    dtype_name,
    read_header,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "EXTRA_FILE_NAMES",
    "TOKENIZER_FILES",
    "cache_dir",
    "config_json",
    "with_tied_head",
]

INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles a training run leaves next to the weights; never weights themselves.
NON_WEIGHT_PICKLES = frozenset(
    {
        "training_args.bin",
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scheduler.bin",
        "scaler.pt",
        "rng_state.pth",
    }
)
# a tokenizer's side files: an output with its own vocabulary (planners/vocabulary.py)
# writes its tokenizer's instead of the base's
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.tiktoken",
        "qwen.tiktoken",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.json",
        "chat_template.jinja",
    }
)
# Files copied into the output next to the merged weights. An explicit allow-list: a
# glob like "*.json" would also copy adapter_config.json (turning the output into a
# broken LoRA adapter for loaders) or trainer state.
EXTRA_FILE_NAMES = TOKENIZER_FILES | {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
}
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]
MAX_INDEX_BYTES = 64 * 2**20
MAX_PROBLEMS = 200

_REPO_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
    r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]{0,199}))?$"
)
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Checkpoint:
    """A validated input: where its tensors are and which side files to copy."""

    source: str
    root: str
    files: tuple[str, ...]
    tensors: dict[str, TensorEntry]
    extra_files: tuple[str, ...]
    revision: str | None = None
    # (name, read from): tensors this checkpoint does not store but is read as having,
    # e.g. ("lm_head.weight", "model.embed_tokens.weight") for tied embeddings
    aliases: tuple[tuple[str, str], ...] = ()
    # a PEFT LoRA adapter (io/lora.py): (Adapter, its weights file); its tensors are
    # the adapter's own until inventory matches it with the base (lora.resolve)
    adapter: object | None = None
    # (name, its rows, rows read): vocabulary tensors with rows beyond the base's
    # (added tokens), read on the base's vocabulary (planners/inventory.on_base_vocab)
    trimmed: tuple[tuple[str, int, int], ...] = ()
    # a hub input planned from its headers only (io/hub_inputs.py): False until its
    # weights are downloaded (hub_inputs.fetch_weights); until then its tensors' offsets
    # are relative to the data section and nothing may be read from its files
    fetched: bool = True
    # a hub input's (file, digest of its tensor table): its version, with the commit
    hub_versions: tuple[tuple[str, str], ...] = ()

    # the base only, under tokenizer: union | <model>: the output's vocabulary
    # (planners/vocabulary.Vocabulary: its rows, tokenizer files, digest)
    vocabulary: object | None = None

    def side_file(self, name: str) -> str | None:
        """The path of side file `name` (config.json, ...) if it has one."""
        return next((f for f in self.extra_files if os.path.basename(f) == name), None)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def cache_dir() -> str:
    """Root of tadmerge's cache (converted pickles live under ``converted/``)."""
    explicit = os.environ.get("TADMERGE_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "tadmerge")


# --------------------------------------------------------------------------- tied heads

HEAD_NAME = "lm_head.weight"
# where a tied head reads its rows from, by architecture (Llama, Qwen2, Gemma, Mistral:
# model.embed_tokens; GPT-2: transformer.wte; GPT-NeoX: gpt_neox.embed_in; BERT-like)
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
MAX_CONFIG_BYTES = 4 * 2**20


def config_json(ck: Checkpoint) -> dict | None:
    """The checkpoint's config.json as a dict; None when it has none or it is not a
    JSON object (what a merge copies of it is its bytes, unchanged)."""
    path = ck.side_file("config.json")
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def with_tied_head(ck: Checkpoint, head: str = HEAD_NAME) -> Checkpoint | None:
    """`ck` read as storing `head` when it does not and its config.json says
    tie_word_embeddings: true: the head is the embedding's TensorEntry read under
    the head's name (Checkpoint.aliases says so). None when that does not apply
    (the head is stored, the config does not tie, no single embedding is found)."""
    if head in ck.tensors:
        return None
    doc = config_json(ck)
    if doc is None or doc.get("tie_word_embeddings") is not True:
        return None
    embeds = [n for n in ck.tensors if n.endswith(EMBED_SUFFIXES)]
    if len(embeds) != 1:
        return None
    # (a dict: the head's entry is the embedding's, under its own name)
    tensors = dict(sorted({**ck.tensors, head: ck.tensors[embeds[0]]}.items()))
    return replace(ck, tensors=tensors, aliases=ck.aliases + ((head, embeds[0]),))


# --------------------------------------------------------------------------- helpers


def _inside(path: str, allowed_real: list[str]) -> bool:
    """True if ``path``'s real path (all symlinks resolved) is within an allowed root."""
    real = os.path.realpath(path)
    for root in allowed_real:
        try:
            if os.path.commonpath([real, root]) == root:
                return True
        except ValueError:
            continue
    return False


def _check_local_file(
    path: str, allowed_real: list[str], what: str, problems: list[InputProblem]
) -> bool:
    """The file exists, is a regular file and does not escape the root via symlinks."""
    if not os.path.lexists(path):
        problems.append(InputProblem(path, None, f"{what} does not exist"))
        return False
    if not _inside(path, allowed_real):
        problems.append(
            InputProblem(
                path,
                None,
                f"{what} resolves to {os.path.realpath(path)}, outside the checkpoint "
                "directory (symlink escape refused)",
            )
        )
        return False
    if not os.path.isfile(path):
        problems.append(InputProblem(path, None, f"{what} is not a regular file"))
        return False
    return True


def _read_header(path: str, problems: list[InputProblem]) -> SafetensorsHeader | None:
    try:
        return read_header(path)
    except InputError as exc:
        problems.extend(exc.problems)
        return None


def _extra_files(root: str, names: list[str], allowed_real: list[str], problems: list) -> list:
    out: list[str] = []
    for name in names:
        if name not in EXTRA_FILE_NAMES:
            continue
        path = os.path.join(root, name)
        if _check_local_file(path, allowed_real, "side file", problems):
            out.append(path)
    return out


def _rel_path_problem(rel: object) -> str | None:
    """Why an index file name is unacceptable, or None. Names must stay inside root."""
    if not isinstance(rel, str) or not rel:
        return f"file name {rel!r} is not a non-empty string"
    if "\x00" in rel:
        return "file name contains a NUL byte"
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        return f"file name {rel!r} is an absolute path; shard names must be relative"
    parts = re.split(r"[/\\]", rel)
    if ".." in parts:
        return f"file name {rel!r} contains '..'; shard names must stay inside the checkpoint"
    return None


def _load_index(path: str, problems: list[InputProblem]) -> dict[str, str] | None:
    """Parse an index file's weight_map (tensor -> file name), reporting problems."""
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX_BYTES:
            problems.append(InputProblem(path, None, f"index is {size} bytes, over the limit"))
            return None
        with open(path, "rb") as fh:
            raw = fh.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        problems.append(InputProblem(path, None, f"cannot read index: {exc.strerror or exc}"))
        return None
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKeys as exc:
        problems.append(InputProblem(path, str(exc)[:200], "index names this key twice"))
        return None
    except (ValueError, RecursionError) as exc:
        problems.append(InputProblem(path, None, f"index is not valid JSON ({str(exc)[:120]})"))
        return None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        problems.append(InputProblem(path, None, "index has no 'weight_map' object"))
        return None
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        problems.append(
            InputProblem(path, bad[0], f"{len(bad)} weight_map value(s) are not file names")
        )
        return None
    return weight_map


# --------------------------------------------------------------------------- safetensors


def _from_index(
    root: str, allowed_real: list[str], problems: list[InputProblem]
) -> tuple[list[str], dict[str, TensorEntry]]:
    index_path = os.path.join(root, INDEX_NAME)
    if not _check_local_file(index_path, allowed_real, "index", problems):
        return [], {}
    weight_map = _load_index(index_path, problems)
    if weight_map is None:
        return [], {}
    if not weight_map:
        problems.append(InputProblem(index_path, None, "index weight_map is empty"))
        return [], {}

    # Group by normalized file name so "./a.safetensors" and "a.safetensors" are one shard
    # and a bad name is reported once, not once per tensor.
    by_file: dict[str, list[str]] = {}
    for tensor, rel in weight_map.items():
        by_file.setdefault(rel, []).append(tensor)
    norm_of: dict[str, str] = {}
    tensors_of: dict[str, list[str]] = {}
    for rel, names in sorted(by_file.items()):
        why = _rel_path_problem(rel)
        if why is not None:
            problems.append(
                InputProblem(index_path, names[0], f"{why} ({len(names)} tensor(s) map to it)")
            )
            continue
        norm = os.path.normpath(rel)
        norm_of[rel] = norm
        tensors_of.setdefault(norm, []).extend(names)

    headers: dict[str, SafetensorsHeader] = {}
    for norm, names in sorted(tensors_of.items()):
        path = os.path.join(root, norm)
        what = f"shard named by the index for {len(names)} tensor(s)"
        if not _check_local_file(path, allowed_real, what, problems):
            continue
        header = _read_header(path, problems)
        if header is not None:
            headers[norm] = header

    where: dict[str, list[str]] = {}
    for norm in sorted(headers):
        for tensor in headers[norm].tensors:
            where.setdefault(tensor, []).append(norm)
    for tensor, norms in sorted(where.items()):
        if len(norms) > 1:
            paths = ", ".join(headers[n].path for n in norms)
            problems.append(
                InputProblem(
                    headers[norms[0]].path,
                    tensor,
                    f"present in {'two' if len(norms) == 2 else len(norms)} shards: {paths}",
                )
            )
            continue
        path = headers[norms[0]].path
        if tensor not in weight_map:
            problems.append(
                InputProblem(path, tensor, f"in this shard but not named by {INDEX_NAME}")
            )
        elif norm_of.get(weight_map[tensor]) != norms[0]:
            problems.append(
                InputProblem(
                    path,
                    tensor,
                    f"in this shard but the index maps it to {weight_map[tensor]!r}",
                )
            )
    entries: dict[str, TensorEntry] = {}
    for tensor in sorted(weight_map):
        norm = norm_of.get(weight_map[tensor])
        if norm is None or norm not in headers:
            continue  # the file itself was already reported
        header = headers[norm]
        if tensor not in header.tensors:
            problems.append(
                InputProblem(header.path, tensor, "named by the index but missing from this shard")
            )
        elif len(where.get(tensor, [])) == 1:
            entries[tensor] = header.tensors[tensor]
    files = sorted(h.path for h in headers.values())
    return files, as_table(entries)


def _single(
    paths: list[str], allowed_real: list[str], problems: list[InputProblem]
) -> tuple[list[str], dict[str, TensorEntry]]:
    files: list[str] = []
    tables = []
    for path in paths:
        if not _check_local_file(path, allowed_real, "weights file", problems):
            continue
        header = _read_header(path, problems)
        if header is not None:
            files.append(header.path)
            tables.append(header.tensors)
    if len(tables) == 1:  # (the usual case: the header's columns as they are)
        return files, tables[0]
    entries: dict[str, TensorEntry] = {}
    for t in tables:
        entries.update(t.items())
    return files, as_table(entries)


# --------------------------------------------------------------------------- pickles


def _pickle_refused(paths: list[str]) -> str:
    names = ", ".join(os.path.basename(p) for p in paths)
    return (
        f"only pickled weights found ({names}); pickled weights are never unpickled by "
        "default because a pickle can run arbitrary code. Convert the checkpoint to "
        "safetensors, or opt in with `allow_pickle: true` (loads with "
        "torch.load(weights_only=True) and converts once to safetensors)"
    )


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def _torch_load(path: str) -> object:
    import torch  # only pickled checkpoints need it

    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception:
        # mmap needs the zip format; legacy (pre-1.6) files load without it, still with
        # weights_only=True so no arbitrary code can run either way.
        return torch.load(path, weights_only=True, map_location="cpu")


def _state_dict(path: str, obj: object, problems: list[InputProblem]) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        problems.append(
            InputProblem(path, None, f"pickle holds a {type(obj).__name__}, not a state dict")
        )
        return {}
    out: dict[str, torch.Tensor] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not name:
            problems.append(InputProblem(path, None, f"state dict key {name!r} is not a name"))
        elif not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            problems.append(
                InputProblem(path, name, f"value is a {type(value).__name__}, not a dense tensor")
            )
        else:
            try:
                dtype_name(value.dtype)
            except ValueError:
                problems.append(
                    InputProblem(path, name, f"dtype {value.dtype} cannot be stored in safetensors")
                )
                continue
            out[name] = value
    return out


def _convert_pickles(paths: list[str], problems: list[InputProblem]) -> str | None:
    """Convert pickled state dicts once into ``<cache>/converted/<sha256>/model.safetensors``."""
    if len(paths) == 1:
        key = _sha256_file(paths[0])
    else:
        joined = "\n".join(f"{os.path.basename(p)}:{_sha256_file(p)}" for p in sorted(paths))
        key = hashlib.sha256(joined.encode("utf-8")).hexdigest()
    converted = os.path.join(cache_dir(), "converted")
    final_dir = os.path.join(converted, key)
    target = os.path.join(final_dir, "model.safetensors")
    if os.path.isfile(target):
        try:
            read_header(target)
            return target
        except InputError:
            shutil.rmtree(final_dir, ignore_errors=True)  # damaged cache entry: redo it

    state: dict[str, torch.Tensor] = {}
    before = len(problems)
    for path in sorted(paths):
        try:
            obj = _torch_load(path)
        except Exception as exc:
            problems.append(
                InputProblem(
                    path,
                    None,
                    f"torch.load(weights_only=True) refused or failed: {str(exc)[:300]}",
                )
            )
            continue
        for name, tensor in _state_dict(path, obj, problems).items():
            if name in state:
                problems.append(InputProblem(path, name, "tensor present in two pickle files"))
            state[name] = tensor
    if len(problems) > before:
        return None

    try:
        os.makedirs(converted, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=converted)
    except OSError as exc:
        problems.append(
            InputProblem(paths[0], None, f"cannot create cache dir {converted}: {exc.strerror}")
        )
        return None
    try:
        specs = [OutputTensor(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in state.items()]
        total = sum(s.nbytes for s in specs)
        meta = {
            "tadmerge_converted_from": ",".join(os.path.basename(p) for p in sorted(paths)),
            "tadmerge_source_sha256": key,
        }
        (shard,) = layout_shards(specs, shard_size=total + 1, metadata=meta)
        create_shard_files(tmp, [shard])
        tmp_file = os.path.join(tmp, shard.filename)
        for name, tensor in state.items():
            write_at(tmp_file, shard.tensor_offset(name), tensor)
        sync_all([tmp_file])
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not os.path.isfile(target):  # not a lost race with another process
                raise
        _fsync_dir(converted)
    except Exception as exc:
        problems.append(
            InputProblem(paths[0], None, f"conversion to safetensors failed: {str(exc)[:300]}")
        )
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pickle_weights(
    root: str, names: list[str], allowed_real: list[str], problems: list[InputProblem]
) -> list[str] | None:
    """The pickle files holding the weights, or None (problem recorded)."""
    if PICKLE_INDEX_NAME in names:
        index_path = os.path.join(root, PICKLE_INDEX_NAME)
        if not _check_local_file(index_path, allowed_real, "index", problems):
            return None
        weight_map = _load_index(index_path, problems)
        if weight_map is None:
            return None
        paths = []
        for rel in sorted(set(weight_map.values())):
            why = _rel_path_problem(rel)
            if why is not None:
                problems.append(InputProblem(index_path, None, why))
                continue
            path = os.path.join(root, os.path.normpath(rel))
            if _check_local_file(path, allowed_real, "pickle shard named by the index", problems):
                paths.append(path)
        return paths if len(paths) == len(set(weight_map.values())) else None
    pickles = [
        n
        for n in names
        if n.endswith(PICKLE_SUFFIXES)
        and n not in NON_WEIGHT_PICKLES
        and os.path.isfile(os.path.join(root, n))
    ]
    if not pickles:
        return []
    if "pytorch_model.bin" in pickles:
        pickles = ["pytorch_model.bin"]
    if len(pickles) > 1:
        problems.append(
            InputProblem(
                root,
                None,
                "several pickled weight files and no index: " + ", ".join(pickles),
            )
        )
        return None
    path = os.path.join(root, pickles[0])
    if not _check_local_file(path, allowed_real, "weights file", problems):
        return None
    return [path]


# --------------------------------------------------------------------------- sources


def _open_directory(
    source: str,
    root: str,
    allowed_real: list[str],
    allow_pickle: bool,
    revision: str | None,
    problems: list[InputProblem],
) -> Checkpoint | None:
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        problems.append(InputProblem(root, None, f"cannot list directory: {exc.strerror}"))
        return None
    from tadmerge.io import lora

    if lora.is_adapter(names):
        opened = lora.open_adapter(root, problems)
        if opened is None:
            return None
        files, entries = _single([opened[1]], allowed_real, problems)
        return Checkpoint(
            source=source,
            root=root,
            files=tuple(files),
            tensors=as_table(entries),
            extra_files=(),
            revision=revision,
            adapter=opened,
        )
    extra = _extra_files(root, names, allowed_real, problems)
    if INDEX_NAME in names:
        files, entries = _from_index(root, allowed_real, problems)
    else:
        st_files = [
            n
            for n in names
            if n.endswith(".safetensors") and not os.path.isdir(os.path.join(root, n))
        ]
        if "model.safetensors" in st_files:
            st_files = ["model.safetensors"]
        if len(st_files) > 1:
            problems.append(
                InputProblem(
                    root,
                    None,
                    f"several safetensors files and no {INDEX_NAME}: "
                    + ", ".join(st_files)
                    + "; add an index or point at one file",
                )
            )
            return None
        if st_files:
            files, entries = _single([os.path.join(root, st_files[0])], allowed_real, problems)
        else:
            pickles = _pickle_weights(root, names, allowed_real, problems)
            if pickles is None:
                return None
            if not pickles:
                problems.append(
                    InputProblem(
                        root,
                        None,
                        f"no weights found: no *.safetensors, no {INDEX_NAME}, "
                        "no pytorch_model.bin",
                    )
                )
                return None
            if not allow_pickle:
                problems.append(InputProblem(pickles[0], None, _pickle_refused(pickles)))
                return None
            converted = _convert_pickles(pickles, problems)
            if converted is None:
                return None
            files, entries = _single([converted], [os.path.realpath(converted)], problems)
    return Checkpoint(
        source=source,
        root=root,
        files=tuple(sorted(files)),
        tensors=as_table(entries),
        extra_files=tuple(extra),
        revision=revision,
    )


def _open_file(
    source: str, path: str, allow_pickle: bool, problems: list[InputProblem]
) -> Checkpoint | None:
    root = os.path.dirname(path)
    allowed = [os.path.realpath(root)]
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    extra = _extra_files(root, names, allowed, problems)
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            problems.append(InputProblem(path, None, _pickle_refused([path])))
            return None
        converted = _convert_pickles([path], problems)
        if converted is None:
            return None
        path = converted
    # The user named this file explicitly, so following a symlink to it is intended.
    files, entries = _single([path], [os.path.realpath(path)], problems)
    return Checkpoint(
        source=source,
        root=root,
        files=tuple(files),
        tensors=entries,
        extra_files=tuple(extra),
        revision=None,
    )


def _parse_repo_id(source: str) -> tuple[str, str | None] | None:
    match = _REPO_ID.match(source)
    if match is None:
        return None
    repo = match.group("repo")
    if ".." in repo or "--" in repo or repo.endswith((".", "-")):
        return None
    if repo.lower().endswith((".safetensors", ".json", *PICKLE_SUFFIXES)):
        return None  # a mistyped local file path, not a repo
    return repo, match.group("rev")


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _hub_problem(
    exc: Exception, source: str, repo_id: str, revision: str | None, offline: bool
) -> InputProblem:
    """A huggingface_hub failure in words. Classified by class name: the exception
    classes moved between huggingface_hub releases, the names did not."""
    shown = repo_id + (f"@{revision}" if revision else "")
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if kinds & {"RepositoryNotFoundError", "GatedRepoError"}:
        message = f"Hugging Face repo {shown} not found or access denied ({detail})"
    elif "RevisionNotFoundError" in kinds:
        message = f"revision {revision!r} not found in Hugging Face repo {repo_id}"
    elif "HFValidationError" in kinds:
        message = f"no such file or directory, and not a valid Hugging Face repo id ({detail})"
    elif offline or kinds & {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectError",
        "TimeoutException",
        "Timeout",
    }:
        message = (
            f"no such local path, and Hugging Face repo id {shown} is not in the local "
            f"cache and the hub is unreachable{' (HF_HUB_OFFLINE is set)' if offline else ''}"
        )
    else:
        message = f"could not fetch Hugging Face repo {shown}: {type(exc).__name__}: {detail}"
    return InputProblem(source, None, message)


def _open_hub(
    source: str,
    repo_id: str,
    revision: str | None,
    allow_pickle: bool,
    problems: list[InputProblem],
    fetch: bool,
) -> Checkpoint | None:
    """Online: pinned to one commit, planned from the headers (io/hub_inputs.py), the
    weights downloaded when `fetch`. Offline (HF_HUB_OFFLINE): the cached snapshot."""
    from huggingface_hub import snapshot_download

    from tadmerge.io import hub_inputs

    offline = _hub_offline()
    pinned = revision
    try:
        if not offline:
            got = hub_inputs.open_headers(source, repo_id, revision, problems)
            if got is None:
                return None
            if isinstance(got, Checkpoint):
                return hub_inputs.fetch_weights(got, repo_id, allow_pickle) if fetch else got
            pinned = got[1]  # (WHOLE, sha): pickles or an adapter, fetched whole
        local = snapshot_download(
            repo_id,
            revision=pinned,
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except InputError as exc:
        problems.extend(exc.problems)
        return None
    except Exception as exc:
        problems.append(_hub_problem(exc, source, repo_id, revision, offline))
        return None
    local = os.path.abspath(local)
    # Hub snapshots are symlinks into the repo cache's blobs/ folder: that is inside.
    allowed = [
        os.path.realpath(local),
        os.path.realpath(os.path.join(local, os.pardir, os.pardir, "blobs")),
    ]
    base = os.path.basename(os.path.normpath(local))
    sha = base if _SHA1.match(base) else None
    ck = _open_directory(source, local, allowed, allow_pickle, sha, problems)
    if ck is None or sha is None:
        return ck
    return replace(ck, hub_versions=hub_inputs.local_versions(ck.files, ck.tensors))


def open_checkpoint(source: str, *, allow_pickle: bool = False, fetch: bool = True) -> Checkpoint:
    """Resolve and validate one input checkpoint; every problem in one InputError.

    `fetch=False`: a hub id is planned from its headers only, its weights not
    downloaded (Checkpoint.fetched False; io/hub_inputs.fetch_weights downloads them)."""
    problems: list[InputProblem] = []
    if not isinstance(source, str) or not source.strip():
        raise InputError(InputProblem(str(source), None, "empty checkpoint source"))
    path = os.path.abspath(os.path.expanduser(source))
    checkpoint: Checkpoint | None
    if os.path.isdir(path):
        checkpoint = _open_directory(
            source, path, [os.path.realpath(path)], allow_pickle, None, problems
        )
    elif os.path.isfile(path):
        checkpoint = _open_file(source, path, allow_pickle, problems)
    elif os.path.lexists(path):
        kind = "a broken symlink" if os.path.islink(path) else "not a file or directory"
        problems.append(InputProblem(path, None, kind))
        checkpoint = None
    elif (repo := _parse_repo_id(source)) is not None:
        checkpoint = _open_hub(source, repo[0], repo[1], allow_pickle, problems, fetch)
    else:
        problems.append(InputProblem(path, None, "no such file or directory"))
        checkpoint = None
    if problems or checkpoint is None:
        if not problems:  # pragma: no cover - every None path records a problem
            problems.append(InputProblem(path, None, "could not open checkpoint"))
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS
            problems = problems[:MAX_PROBLEMS]
            problems.append(InputProblem(source, None, f"... and {more} more problems"))
        raise InputError(problems)
    if not checkpoint.tensors:
        raise InputError(InputProblem(path, None, "checkpoint holds no tensors"))
    return checkpoint
