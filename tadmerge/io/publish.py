"""Staging, manifest and atomic publish of a merged output directory.

Protocol (why: a nightly job killed at any instant must leave either the previous
output or the new complete one, never a half-written directory under the output name,
and must never delete a file a user put in an earlier output):

1. :class:`Staging` creates ``<parent>/.<name>.tadmerge-staging``; all writes go there.
   It takes a lock there (``.tadmerge/lock``, flock, held until the merge ends: a second
   merge or ``--resume`` on it is refused naming the holder's pid, host and start time;
   a killed run's lock dies with its process). An interrupted run leaves the staging
   directory behind, and the next run refuses to start unless told ``--resume``
   (continue in it) or the user removes it.
2. :meth:`Staging.publish` fsyncs every file, writes ``manifest.json`` (relative path,
   size and sha256 of every file but the private ``.tadmerge/`` folder: the resume
   state and the lock), fsyncs the directories, then renames staging to the output in
   one ``rename``. The resume state travels with it and is deleted from the published
   output only afterwards, so no instant exists where a staging directory lacks the
   fingerprint of the plan its files belong to. With ``overwrite`` the old output is
   swapped out in one ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere it is renamed
   aside first, then staging renamed in) and deleted only after the new one is in
   place, and only if it holds nothing but the files its manifest lists.
3. :func:`verify_output` re-hashes a published directory against its manifest.

A run killed after the rename but before ``.tadmerge/`` left the output: the next run
for that output finishes the job (removes it, and the old output an ``--overwrite``
swapped out) before anything else.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor

from tadmerge.errors import MergeRuntimeError, OutputError, VerifyError
from tadmerge.io import libc
from tadmerge.io.block_io import close_all, sync_all

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "STATE_DIR",
    "Staging",
    "check_output_outside_inputs",
    "fsync_dir",
    "require_verified",
    "verify_output",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tadmerge-manifest/1"
_MANIFEST_TMP = ".manifest.json.tmp"
_HASH_BLOCK = 8 * 2**20
# the staging directory's private folder: the driver's resume state (run/state.py)
# and the lock. Never in a manifest; removed from the output right after the rename.
STATE_DIR = ".tadmerge"
LOCK_NAME = "lock"
_NAMED = 10  # files named at most in a refusal
log = logging.getLogger("tadmerge")


# --------------------------------------------------------------------------- fs helpers


def fsync_dir(path: str) -> None:
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
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# the process's own symbols (libc's among them): find_library("c") would run ldconfig
# in a child process, forking a merge of hundreds of MB
_renameat2 = libc.function(
    "renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
)
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def _renameat2_call(src: str, dst: str, flags: int) -> bool:
    """renameat2(src, dst, flags): True once done, False where this kernel, libc or
    filesystem does not offer the flag; any other failure raises OSError."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), dst)


def _rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails instead of replacing ``dst`` (renameat2 RENAME_NOREPLACE).

    Plain rename silently replaces an empty directory that appeared meanwhile; fall back
    to it (after an existence check) where renameat2 is unavailable.
    """
    if _renameat2_call(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _rename_exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (renameat2 RENAME_EXCHANGE, Linux 3.15+ on
    local filesystems); False where that is not offered (the caller falls back)."""
    return _renameat2_call(a, b, _RENAME_EXCHANGE)


def _named(paths: list[str]) -> str:
    more = f" (and {len(paths) - _NAMED} more)" if len(paths) > _NAMED else ""
    return ", ".join(paths[:_NAMED]) + more


def read_manifest(path: str) -> dict | None:
    """The manifest of directory `path` if it is a tadmerge one, else None."""
    try:
        with open(os.path.join(path, MANIFEST_NAME), "rb") as fh:
            doc = json.loads(fh.read(64 * 2**20))
    except (OSError, ValueError):
        return None
    if not (isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT):
        return None
    if not isinstance(doc.get("files"), list):
        return None
    return doc


def _replace_refusal(path: str) -> str | None:
    """Why the directory `path` may not be replaced (deleted), or None when it may:
    an empty directory, or a tadmerge output holding no file that its manifest does not
    list and no listed file whose size changed (edited after the publish). Contents of
    listed files are not re-hashed (that would read the whole old output); the private
    ``.tadmerge/`` folder an interrupted publish left is not a user's file.
    """
    if os.path.islink(path) or not os.path.isdir(path):
        return "is not a directory"
    try:
        if not os.listdir(path):
            return None
        doc = read_manifest(path)
        if doc is None:
            return f"is not a tadmerge output (no {MANIFEST_NAME}) nor an empty directory"
        sizes = {
            e["path"]: e.get("size") for e in doc["files"] if isinstance(e, dict) and "path" in e
        }
        files, odd = _walk(path, strict=False)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    foreign = [
        r for r in files + odd if r != MANIFEST_NAME and not _under(r, STATE_DIR) and r not in sizes
    ]
    changed = []
    for rel in files:
        if rel in sizes:
            try:
                if os.path.getsize(os.path.join(path, rel)) != sizes[rel]:
                    changed.append(rel)
            except OSError:
                changed.append(rel)
    if foreign:
        return (
            f"holds {len(foreign)} file(s) that are not in its {MANIFEST_NAME} (added "
            f"after it was published?): {_named(sorted(foreign))}"
        )
    if changed:
        return f"holds {len(changed)} file(s) changed since it was published: {_named(changed)}"
    return None


# --------------------------------------------------------------------------- lock


def _lock_path(directory: str) -> str:
    return os.path.join(directory, STATE_DIR, LOCK_NAME)


def _holder(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(4096))
        return f"pid {doc['pid']} on host {doc['host']}, started {doc['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def _lock_holder(directory: str) -> str | None:
    """Who holds `directory`'s lock (a live process: a flock dies with its holder),
    or None when nobody does."""
    if fcntl is None:
        return None
    path = _lock_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(path)
        except OSError:
            return None  # no flock on this filesystem
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _in_use(directory: str, holder: str) -> OutputError:
    return OutputError(
        f"{directory} is in use by another tadmerge run ({holder}); wait for it to end, "
        "or stop it and rerun with --resume"
    )


def _flock_and_sign(fd: int, path: str, target: str) -> int | None | bool:
    """Lock the open file `fd` (flock, exclusive, not waiting) and write who holds it
    (pid, host, start time). Returns `fd`; None where the filesystem has no flock (a
    warning says the run goes unlocked, `fd` closed); False when `path` no longer
    names the file locked (its holder let go and unlinked it meanwhile: `fd`
    closed). Raises OutputError naming the holder when another run holds it."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(target, _holder(path)) from None
        except OSError as exc:  # a filesystem without flock: run unlocked
            log.warning("cannot lock %s (%s); running without a lock", path, exc.strerror)
            os.close(fd)
            return None
        st = os.fstat(fd)
        try:
            now = os.stat(path)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            return False
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())  # (at offset 0: a fresh descriptor)
        except OSError:
            pass  # the holder's details are a courtesy; the flock is the lock
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    return fd


def _acquire_lock(directory: str) -> int | None:
    """Take `directory`'s lock (exclusive, not waiting) and write who holds it.

    Returns the descriptor that holds it, or None where flock is unavailable.
    """
    state = os.path.join(directory, STATE_DIR)
    path = _lock_path(directory)
    try:
        os.makedirs(state, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise MergeRuntimeError(
            f"cannot create the lock {path}: {exc.strerror or exc}; fix the cause and rerun"
            + (" with --resume" if os.path.isdir(directory) else "")
        ) from None
    if fcntl is None:  # pragma: no cover
        os.close(fd)
        return None
    held = _flock_and_sign(fd, path, directory)
    if held is False:
        raise OutputError(
            f"{directory} was published or removed by another run while locking it; rerun"
        )
    return held


def _output_lock_path(parent: str, name: str) -> str:
    return os.path.join(parent, f".{name}.tadmerge-lock")


def _acquire_output_lock(parent: str, name: str, output: str) -> tuple[int, str] | None:
    """Take the lock beside the output (``.<name>.tadmerge-lock``: flock, exclusive, not
    waiting) for the whole run, and write who holds it. Two runs for the same output,
    fresh or resumed, never interleave: the second is refused naming the first, even
    before either has a staging directory. The holder unlinks the file before it lets
    go (:func:`_release_output_lock`), so a lock taken is only trusted once the path
    still names the file locked. A dead holder's flock dies with it (its file stays,
    and is taken over). Returns (descriptor, path), or None where flock is unavailable.
    """
    if fcntl is None:  # pragma: no cover
        return None
    path = _output_lock_path(parent, name)
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise OutputError(
                f"cannot create the output lock {path}: {exc.strerror or exc}; check the "
                "output path and its permissions"
            ) from None
        held = _flock_and_sign(fd, path, output)
        if held is False:
            continue  # its holder released it (unlinked) meanwhile: take the new one
        return None if held is None else (held, path)
    raise OutputError(f"cannot take the output lock {path}: it keeps being replaced; rerun")


def _release_output_lock(held: tuple[int, str]) -> None:
    """Unlink the lock file, then let go of it (in that order: see above)."""
    fd, path = held
    try:
        st, own = os.stat(path), os.fstat(fd)
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


# --------------------------------------------------------------------------- history
# output.keep: every run is published under a dated sibling `<name>.<UTC time>` and
# `<name>` is a symlink to the newest, switched in one rename.

_STAMP = "%Y%m%dT%H%M%SZ"


def _version_suffix(entry: str, name: str) -> tuple[str, int] | None:
    """(timestamp, n) when `entry` is a dated version `<name>.<stamp>[-n]` of `name`."""
    if not entry.startswith(name + "."):
        return None
    rest = entry[len(name) + 1 :]
    stamp, _, n = rest.partition("-")
    if len(stamp) != 16 or stamp[8] != "T" or stamp[-1] != "Z":
        return None
    if not (stamp[:8].isdigit() and stamp[9:15].isdigit()):
        return None
    if n and not n.isdigit():
        return None
    return stamp, int(n or 0)


def versions(output: str) -> list[str]:
    """The dated versions of `output` (full paths), oldest first."""
    out = os.path.abspath(output)
    parent, name = os.path.dirname(out), os.path.basename(out)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for entry in entries:
        key = _version_suffix(entry, name)
        full = os.path.join(parent, entry)
        if key is not None and os.path.isdir(full) and not os.path.islink(full):
            found.append((key, full))
    return [full for _, full in sorted(found)]


def switch_link(link: str, target: str) -> None:
    """Point the symlink `link` at `target` (a sibling) atomically: a new symlink
    under a temporary name, renamed over `link`. Readers see the old or the new."""
    parent = os.path.dirname(link)
    tmp = os.path.join(parent, f".{os.path.basename(link)}.tadmerge-link-{secrets.token_hex(4)}")
    os.symlink(os.path.basename(target), tmp)  # relative: the same on every node's mount
    try:
        os.rename(tmp, link)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(parent)


def prune_versions(output: str, keep: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Delete the dated versions of `output` but the newest `keep` (and those named in
    `protect`): only those that are verifiably tadmerge outputs (a manifest listing
    every file, sizes unchanged); others are kept and logged. Returns those deleted."""
    found = versions(output)
    old = found[: max(0, len(found) - keep)]
    deleted = []
    for path in old:
        if path in protect:
            continue
        why = _replace_refusal(path)
        if why is None:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
        else:
            log.warning("output.keep: kept the old version %s: it %s", path, why)
    return deleted


# --------------------------------------------------------------------------- manifest


def _under(rel: str, folder: str | None) -> bool:
    return folder is not None and (rel == folder or rel.startswith(folder + "/"))


def write_manifest(
    directory: str, exclude: str | None = None, known: dict[str, tuple[int, str]] | None = None
) -> dict:
    """Hash every file of ``directory`` into ``manifest.json`` (atomic) and return it.

    ``exclude`` names a subdirectory left out (the staging directory's private folder).
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
        if _under(rel, STATE_DIR):
            continue  # resume state a publish killed after its rename left: not weights
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
    """The hidden sibling directory a merge writes into before it is published.

    Holds the staging directory's lock from construction until :meth:`publish` or
    :meth:`close` (a process that dies releases it too).
    """

    def __init__(
        self, output: str, *, overwrite: bool = False, resume: bool = False, keep: int = 0
    ) -> None:
        out = os.path.abspath(os.path.expanduser(output))
        name = os.path.basename(out)
        if not name or name in (".", ".."):
            raise OutputError(f"output path {output!r} has no directory name; name the output")
        self.output = out
        self.parent = os.path.dirname(out)
        self.name = name
        self.overwrite = overwrite
        self.resume = resume
        # output.keep: published under a dated sibling, `out` a symlink to the newest
        self.keep = keep
        self.link = out if keep else None
        self.path = os.path.join(self.parent, f".{name}.tadmerge-staging")
        self._published = False
        self._lock_fd: int | None = None
        self._output_lock: tuple[int, str] | None = None

        try:
            os.makedirs(self.parent, exist_ok=True)
        except OSError as exc:  # e.g. a parent component is a regular file
            raise OutputError(
                f"cannot create the output's parent directory {self.parent}: "
                f"{exc.strerror or exc}; choose another output path"
            ) from None
        self._output_lock = _acquire_output_lock(self.parent, name, out)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        out, resume, overwrite = self.output, self.resume, self.overwrite
        if self.keep:
            self._finish_interrupted_keep()
            if os.path.lexists(out) and not os.path.islink(out):
                raise OutputError(
                    f"output.keep: {out} exists and is not a symlink; tadmerge publishes "
                    f"each run as {out}.<UTC time> and points {out} at the newest: move "
                    "it aside (or rename it to such a dated name) and rerun"
                )
            finished = False
        else:
            finished = self._finish_interrupted_publish()
        if os.path.lexists(out) and not self.keep:
            if resume and finished and not os.path.lexists(self.path):
                raise OutputError(
                    f"--resume: the interrupted merge had already published {out} (its "
                    "leftover resume state is removed now); there is nothing to resume"
                )
            if not overwrite:
                raise OutputError(
                    f"output {out} already exists; pass --overwrite to replace it "
                    "or choose another path"
                )
            self._require_replaceable()
        if os.path.lexists(self.path):
            if os.path.islink(self.path) or not os.path.isdir(self.path):
                raise OutputError(f"{self.path} is not a directory; remove it and rerun")
            if (holder := _lock_holder(self.path)) is not None:
                raise _in_use(self.path, holder)
            if not resume:
                raise OutputError(
                    f"an interrupted merge left {self.path}; rerun with --resume or remove it"
                )
            self._lock_fd = _acquire_lock(self.path)
        else:
            if resume:
                raise OutputError(
                    f"--resume requested but there is no staging directory {self.path}; "
                    "rerun without --resume"
                )
            try:
                os.mkdir(self.path, 0o755)
            except FileExistsError:
                holder = _lock_holder(self.path)
                if holder is not None:
                    raise _in_use(self.path, holder) from None
                raise OutputError(
                    f"an interrupted merge left {self.path}; rerun with --resume or remove it"
                ) from None
            except OSError as exc:
                raise OutputError(
                    f"cannot create staging directory {self.path}: {exc.strerror}; "
                    "check the output path and its permissions"
                ) from None
            self._lock_fd = _acquire_lock(self.path)

    def close(self) -> None:
        """Release the staging directory's lock and the output's (the merge is over,
        published or not)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)
        held, self._output_lock = getattr(self, "_output_lock", None), None
        if held is not None:
            _release_output_lock(held)

    def _dated(self) -> str:
        """A new dated version name `<output>.<UTC time>`, sorting after every existing
        version (`-n` added within one second, or after a clock step back)."""
        stamp, n = time.strftime(_STAMP, time.gmtime()), 0
        found = [_version_suffix(os.path.basename(v), self.name) for v in versions(self.output)]
        if found and (stamp, n) <= max(found):
            stamp, n = max(found)[0], max(found)[1] + 1
        while True:
            path = f"{self.output}.{stamp}" + (f"-{n}" if n else "")
            if not os.path.lexists(path):
                return path
            n += 1

    def _finish_interrupted_keep(self) -> None:
        """output.keep: finish a publish killed after its rename into a dated version
        (its `.tadmerge/` folder left, the symlink not yet switched): every dated
        version is a complete output once renamed, so the newest one is the output."""
        found = versions(self.output)
        for path in found:
            state = os.path.join(path, STATE_DIR)
            if not os.path.isdir(state) or os.path.islink(state):
                continue
            if read_manifest(path) is None:
                continue
            if (holder := _lock_holder(path)) is not None:
                raise _in_use(path, holder)
            try:
                shutil.rmtree(state)
                fsync_dir(path)
            except OSError as exc:
                raise OutputError(
                    f"{path}: cannot finish the interrupted publish that left {state}: "
                    f"{exc.strerror or exc}; remove {state} yourself"
                ) from None
        if found and (not os.path.lexists(self.output) or os.path.islink(self.output)):
            newest = found[-1]
            if os.path.realpath(self.output) != os.path.realpath(newest):
                try:
                    switch_link(self.output, newest)
                except OSError as exc:
                    raise OutputError(
                        f"cannot point {self.output} at {newest}: {exc.strerror or exc}"
                    ) from None
                log.info("finished the interrupted publish of %s", newest)

    def __del__(self) -> None:
        self.close()

    def _aside(self) -> str:
        return os.path.join(
            self.parent, f".{self.name}.tadmerge-old-{os.getpid()}-{secrets.token_hex(4)}"
        )

    def _require_replaceable(self, when: str = "") -> None:
        why = _replace_refusal(self.output)
        if why is not None:
            move = "move those files out of it, " if "file(s)" in why else ""
            raise OutputError(
                f"output {self.output} {why}; refusing to replace it even with --overwrite"
                f"{when}: {move}remove it yourself, or choose another path"
            )

    def _finish_interrupted_publish(self) -> bool:
        """Finish a publish that was killed after its rename: the output still holds the
        private `.tadmerge/` folder (and an --overwrite's old output may still sit at the
        staging name). True when there was one to finish."""
        state = os.path.join(self.output, STATE_DIR)
        if os.path.islink(self.output) or not os.path.isdir(state) or os.path.islink(state):
            return False
        if read_manifest(self.output) is None:
            return False  # not a tadmerge output: leave it alone
        if (holder := _lock_holder(self.output)) is not None:
            raise _in_use(self.output, holder)
        try:
            if (
                os.path.isdir(self.path)
                and not os.path.islink(self.path)
                and not os.path.lexists(os.path.join(self.path, STATE_DIR))
            ):
                # swapped out by RENAME_EXCHANGE, not yet renamed aside
                aside = self._aside()
                os.rename(self.path, aside)
                self._discard(aside)
            shutil.rmtree(state)
            fsync_dir(self.output)
            self._remove_stale_asides()
        except OSError as exc:
            raise OutputError(
                f"{self.output}: cannot finish the interrupted publish that left {state}: "
                f"{exc.strerror or exc}; remove {state} yourself"
            ) from None
        log.info("finished the interrupted publish of %s", self.output)
        return True

    def publish(self, known: dict[str, tuple[int, str]] | None = None) -> str:
        """fsync, write the manifest, and rename staging to the output atomically.

        The private `.tadmerge/` folder (resume state, lock) is left out of the manifest
        and deleted from the output only after the rename, so a failure or a kill
        before it leaves a staging directory that can still be resumed, and only with
        its own plan. `known`: digests streamed while the files were written (see
        write_manifest).
        """
        if self._published:
            raise OutputError(f"{self.output} was already published from this staging")
        if os.path.islink(self.path) or not os.path.isdir(self.path):
            raise OutputError(f"staging directory {self.path} is gone; rerun the merge")
        try:
            files, _ = _walk(self.path, strict=True)
            files = [f for f in files if not _under(f, STATE_DIR)]
            sync_all(os.path.join(self.path, rel) for rel in files)
            write_manifest(self.path, exclude=STATE_DIR, known=known)
            for dirpath, _dirs, _files in os.walk(self.path):
                fsync_dir(dirpath)
        except OSError as exc:
            raise MergeRuntimeError(
                f"cannot finalize {exc.filename or self.path}: {exc.strerror or exc}; the "
                "staging directory is kept: fix it and rerun with --resume"
            ) from None

        old = None
        if self.keep:
            self.output = self._dated()
        if os.path.lexists(self.output):
            if not self.overwrite:
                raise OutputError(
                    f"output {self.output} appeared while merging; pass --overwrite or remove it"
                )
            # again: files may have been added to the old output during the merge
            self._require_replaceable(" (the staging directory is kept for --resume)")
            old = self._swap()
        else:
            try:
                _rename_noreplace(self.path, self.output)
            except OSError as exc:
                raise OutputError(
                    f"cannot publish {self.path} as {self.output}: {exc.strerror}; "
                    "the staging directory is kept, rerun with --resume"
                ) from None
        self._published = True
        try:
            fsync_dir(self.parent)
        except OSError:
            pass  # published already; a failing directory fsync cannot be undone here
        # Cached descriptors of staging files now point into the output; drop them so a
        # later --overwrite can actually free the old files' space.
        close_all()
        try:
            shutil.rmtree(os.path.join(self.output, STATE_DIR))
            fsync_dir(self.output)
        except OSError as exc:
            log.warning(
                "published %s but could not remove its %s/ folder (%s); the next run for "
                "this output removes it",
                self.output,
                STATE_DIR,
                exc.strerror or exc,
            )
        if self.link is not None:
            try:
                switch_link(self.link, self.output)
            except OSError as exc:
                self.close()
                raise OutputError(
                    f"published {self.output} but could not point {self.link} at it: "
                    f"{exc.strerror or exc}; the next run for this output does"
                ) from None
            prune_versions(self.link, self.keep, protect=(self.output,))
        self.close()
        if old is not None:
            self._discard(old)
        self._remove_stale_asides()
        return self.output

    def _swap(self) -> str:
        """Put staging in place of the existing output; returns where the old one is."""
        aside = self._aside()
        try:
            exchanged = _rename_exchange(self.path, self.output)
        except OSError as exc:
            raise OutputError(
                f"cannot publish {self.path} as {self.output}: {exc.strerror}; "
                "the staging directory is kept, rerun with --resume"
            ) from None
        if exchanged:
            # the old output is at the staging name now: give that name back
            try:
                os.rename(self.path, aside)
            except OSError:
                return self.path
            return aside
        # no RENAME_EXCHANGE here: two renames, with an instant of no output between
        try:
            os.rename(self.output, aside)
        except OSError as exc:
            raise OutputError(
                f"cannot move the old output {self.output} aside: {exc.strerror}; "
                "the staging directory is kept, rerun with --resume"
            ) from None
        try:
            _rename_noreplace(self.path, self.output)
        except OSError as exc:
            try:
                os.rename(aside, self.output)
            except OSError:
                pass
            raise OutputError(
                f"cannot publish {self.path} as {self.output}: {exc.strerror}; "
                "the staging directory is kept, rerun with --resume"
            ) from None
        return aside

    @staticmethod
    def _discard(old: str) -> None:
        """Delete a replaced output, unless it is not verifiably an earlier tadmerge
        output (holds files its manifest does not list): then keep it and say so."""
        why = _replace_refusal(old)
        if why is None:
            shutil.rmtree(old, ignore_errors=True)
        else:
            log.warning("kept the replaced output at %s: it %s", old, why)

    def _remove_stale_asides(self) -> None:
        """Delete old outputs that an interrupted --overwrite left beside this one."""
        prefix = f".{self.name}.tadmerge-old-"
        try:
            names = os.listdir(self.parent)
        except OSError:
            return
        for entry in names:
            if entry.startswith(prefix):
                self._discard(os.path.join(self.parent, entry))


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
