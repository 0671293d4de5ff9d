"""Staging, manifest and atomic publish of a merged output directory.

Protocol (why: a nightly job killed at any instant must leave either the previous
output or the new complete one, never a half-written directory under the output name):

1. :class:`Staging` creates ``<parent>/.<name>.tadmerge-staging``; all writes go there.
   An interrupted run leaves it behind, and the next run refuses to start unless told
   ``--resume`` (continue in it) or the user removes it.
2. :meth:`Staging.publish` fsyncs every file, writes ``manifest.json`` (relative path,
   size and sha256 of every other file), fsyncs the directory, then renames staging to
   the output in one ``rename``. With ``overwrite`` the old output is first renamed to a
   hidden sibling and deleted only after the new one is in place.
3. :func:`verify_output` re-hashes a published directory against its manifest.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor

from tadmerge.errors import MergeRuntimeError, OutputError, VerifyError
from tadmerge.io.block_io import close_all, sync_all

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "Staging",
    "check_output_outside_inputs",
    "require_verified",
    "verify_output",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tadmerge-manifest/1"
_MANIFEST_TMP = ".manifest.json.tmp"
_HASH_BLOCK = 8 * 2**20


# --------------------------------------------------------------------------- fs helpers


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _walk(directory: str, *, strict: bool) -> tuple[list[str], list[str]]:
    """Relative posix paths of regular files, and of anything else found.

    Outputs hold regular files only: a symlink in an output could point anywhere.
    With ``strict`` an irregular entry raises OutputError instead of being returned.
    """
    files: list[str] = []
    odd: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if stat.S_ISREG(mode):
                files.append(rel)
            elif strict:
                raise OutputError(f"{full} is not a regular file; outputs hold regular files only")
            else:
                odd.append(rel)
    return sorted(files), sorted(odd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails instead of replacing ``dst`` (renameat2 RENAME_NOREPLACE).

    Plain rename silently replaces an empty directory that appeared meanwhile; fall back
    to it (after an existence check) where renameat2 is unavailable.
    """
    try:
        # the process's own symbols (libc's among them): find_library("c") would
        # run ldconfig in a child process, forking a merge of hundreds of MB
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _is_replaceable(path: str) -> bool:
    """Only an empty directory or a previous tadmerge output may be replaced.

    Guards ``--overwrite`` against a mistyped output path deleting a real directory.
    """
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        if not os.listdir(path):
            return True
        with open(os.path.join(path, MANIFEST_NAME), "rb") as fh:
            doc = json.loads(fh.read(16 * 2**20))
        return isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- manifest


def _under(rel: str, folder: str | None) -> bool:
    return folder is not None and (rel == folder or rel.startswith(folder + "/"))


def write_manifest(
    directory: str, exclude: str | None = None, known: dict[str, tuple[int, str]] | None = None
) -> dict:
    """Hash every file of ``directory`` into ``manifest.json`` (atomic) and return it.

    ``exclude`` names a subdirectory left out (a scratch folder deleted before publish).
    ``known``: {file: (size, sha256)} hashed while it was written (io/digest.py),
    taken for a file whose size still matches instead of reading it again.
    """
    files, _ = _walk(directory, strict=True)
    keep = [r for r in files if r not in (MANIFEST_NAME, _MANIFEST_TMP) and not _under(r, exclude)]
    full = [os.path.join(directory, rel) for rel in keep]
    sizes = [os.path.getsize(f) for f in full]
    known = known or {}
    digests: list[str | None] = [
        known[rel][1] if rel in known and known[rel][0] == n else None
        for rel, n in zip(keep, sizes, strict=True)
    ]
    todo = [i for i, d in enumerate(digests) if d is None]
    # hashlib releases the GIL on large buffers: shards hash in parallel
    with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        for i, d in zip(todo, pool.map(_sha256, [full[i] for i in todo]), strict=True):
            digests[i] = d
    entries = [
        {"path": rel, "size": n, "sha256": d}
        for rel, n, d in zip(keep, sizes, digests, strict=True)
    ]
    manifest = {"format": MANIFEST_FORMAT, "files": entries}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    tmp = os.path.join(directory, _MANIFEST_TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, MANIFEST_NAME))
    return manifest


def verify_output(path: str) -> list[str]:
    """Re-check a published output against its manifest; returns problems (empty = OK)."""
    root = os.path.abspath(path)
    mpath = os.path.join(root, MANIFEST_NAME)
    if not os.path.isdir(root):
        return [f"{root}: not a directory"]
    try:
        with open(mpath, "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return [f"{mpath}: missing"]
    except (OSError, ValueError) as exc:
        return [f"{mpath}: unreadable or not JSON ({exc})"]
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return [f"{mpath}: not a {MANIFEST_FORMAT} manifest"]
    entries = doc.get("files")
    if not isinstance(entries, list):
        return [f"{mpath}: 'files' is not a list"]

    problems: list[str] = []
    listed: set[str] = set()
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            problems.append(f"{mpath}: malformed entry {str(entry)[:200]}")
            continue
        rel = entry["path"]
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or rel in ("", MANIFEST_NAME):
            problems.append(f"{mpath}: refusing entry path {rel!r}")
            continue
        listed.add(rel)
        full = os.path.join(root, *parts)
        if not os.path.lexists(full):
            problems.append(f"{full}: missing (listed in the manifest)")
        elif os.path.islink(full) or not os.path.isfile(full):
            problems.append(f"{full}: not a regular file")
        elif (size := os.path.getsize(full)) != entry["size"]:
            problems.append(f"{full}: size {size}, manifest says {entry['size']}")
        elif _sha256(full) != entry["sha256"]:
            problems.append(f"{full}: sha256 differs from the manifest (content changed)")
    files, odd = _walk(root, strict=False)
    for rel in files + odd:
        if rel != MANIFEST_NAME and rel not in listed:
            problems.append(f"{os.path.join(root, rel)}: not in the manifest")
    return problems


def require_verified(path: str) -> None:
    """:func:`verify_output`, raising VerifyError with every problem if there are any."""
    problems = verify_output(path)
    if problems:
        raise VerifyError(f"{path} does not match its manifest:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- staging


class Staging:
    """The hidden sibling directory a merge writes into before it is published."""

    def __init__(self, output: str, *, overwrite: bool = False, resume: bool = False) -> None:
        out = os.path.abspath(os.path.expanduser(output))
        name = os.path.basename(out)
        if not name or name in (".", ".."):
            raise OutputError(f"output path {output!r} has no directory name; name the output")
        self.output = out
        self.parent = os.path.dirname(out)
        self.name = name
        self.overwrite = overwrite
        self.resume = resume
        self.path = os.path.join(self.parent, f".{name}.tadmerge-staging")
        self._published = False

        if os.path.lexists(out):
            if not overwrite:
                raise OutputError(
                    f"output {out} already exists; pass --overwrite to replace it "
                    "or choose another path"
                )
            self._require_replaceable()
        if os.path.lexists(self.path):
            if not resume:
                raise OutputError(
                    f"an interrupted merge left {self.path}; rerun with --resume or remove it"
                )
            if os.path.islink(self.path) or not os.path.isdir(self.path):
                raise OutputError(f"{self.path} is not a directory; remove it and rerun")
        else:
            if resume:
                raise OutputError(
                    f"--resume requested but there is no staging directory {self.path}; "
                    "rerun without --resume"
                )
            try:
                os.makedirs(self.parent, exist_ok=True)
            except OSError as exc:  # e.g. a parent component is a regular file
                raise OutputError(
                    f"cannot create the output's parent directory {self.parent}: "
                    f"{exc.strerror or exc}; choose another output path"
                ) from None
            try:
                os.mkdir(self.path, 0o755)
            except FileExistsError:
                raise OutputError(
                    f"an interrupted merge left {self.path}; rerun with --resume or remove it"
                ) from None
            except OSError as exc:
                raise OutputError(
                    f"cannot create staging directory {self.path}: {exc.strerror}; "
                    "check the output path and its permissions"
                ) from None

    def _require_replaceable(self) -> None:
        if not _is_replaceable(self.output):
            raise OutputError(
                f"output {self.output} exists and is not a tadmerge output (no {MANIFEST_NAME}) "
                "nor an empty directory; refusing to replace it even with --overwrite, "
                "remove it yourself or choose another path"
            )

    def publish(
        self, scratch: str | None = None, known: dict[str, tuple[int, str]] | None = None
    ) -> str:
        """fsync, write the manifest, and rename staging to the output atomically.

        `scratch` names a subdirectory (the resume log) that is left out of the
        manifest and deleted only just before the rename, so a failure while
        finalizing can still be resumed. `known`: digests streamed while the
        files were written (see write_manifest).
        """
        if self._published:
            raise OutputError(f"{self.output} was already published from this staging")
        if os.path.islink(self.path) or not os.path.isdir(self.path):
            raise OutputError(f"staging directory {self.path} is gone; rerun the merge")
        try:
            files, _ = _walk(self.path, strict=True)
            files = [f for f in files if not _under(f, scratch)]
            sync_all(os.path.join(self.path, rel) for rel in files)
            write_manifest(self.path, exclude=scratch, known=known)
            for dirpath, _dirs, _files in os.walk(self.path):
                _fsync_dir(dirpath)
            if scratch:
                shutil.rmtree(os.path.join(self.path, scratch), ignore_errors=True)
        except OSError as exc:
            raise MergeRuntimeError(
                f"cannot finalize {exc.filename or self.path}: {exc.strerror or exc}; the "
                "staging directory is kept: fix it and rerun with --resume"
            ) from None

        aside = None
        if os.path.lexists(self.output):
            if not self.overwrite:
                raise OutputError(
                    f"output {self.output} appeared while merging; pass --overwrite or remove it"
                )
            self._require_replaceable()
            aside = os.path.join(
                self.parent, f".{self.name}.tadmerge-old-{os.getpid()}-{secrets.token_hex(4)}"
            )
            try:
                os.rename(self.output, aside)
            except OSError as exc:
                raise OutputError(
                    f"cannot move the old output {self.output} aside: {exc.strerror}"
                ) from None
        try:
            _rename_noreplace(self.path, self.output)
        except OSError as exc:
            if aside is not None:
                try:
                    os.rename(aside, self.output)
                except OSError:
                    pass
            raise OutputError(
                f"cannot publish {self.path} as {self.output}: {exc.strerror}; "
                "the staging directory is kept, rerun with --resume"
            ) from None
        try:
            _fsync_dir(self.parent)
        except OSError:
            pass  # published already; a failing directory fsync cannot be undone here
        self._published = True
        # Cached descriptors of staging files now point into the output; drop them so a
        # later --overwrite can actually free the old files' space.
        close_all()
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self._remove_stale_asides()
        return self.output

    def _remove_stale_asides(self) -> None:
        """Delete old outputs a crash between the two renames left behind."""
        prefix = f".{self.name}.tadmerge-old-"
        try:
            names = os.listdir(self.parent)
        except OSError:
            return
        for entry in names:
            if entry.startswith(prefix):
                shutil.rmtree(os.path.join(self.parent, entry), ignore_errors=True)


def check_output_outside_inputs(output: str, input_roots: list[str]) -> None:
    """Refuse an output that is, contains or lies inside an input checkpoint.

    Publishing renames over the output and ``--overwrite`` deletes the old one, so an
    overlap with an input could destroy the very weights being merged.
    """
    out = os.path.realpath(os.path.abspath(os.path.expanduser(output)))
    for root in input_roots:
        real = os.path.realpath(os.path.abspath(os.path.expanduser(root)))
        try:
            common = os.path.commonpath([out, real])
        except ValueError:
            continue
        if out == real:
            raise OutputError(f"output {output} is the input checkpoint {root}; choose another")
        if common == real:
            raise OutputError(f"output {output} is inside the input checkpoint {root}; move it")
        if common == out:
            raise OutputError(f"input checkpoint {root} is inside the output {output}; move it")
