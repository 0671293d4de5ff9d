"""Which version of an input file a merge reads: its identity, checked until publish.

An input may change while a merge runs or between a kill and ``--resume``:
rewritten in place, atomically replaced (even by the same values under a
longer header), or rewritten with its size and mtime kept (``cp -p``,
``rsync -t``, ``os.utime`` back to the old mtime). A merge must never publish
bytes that mix two versions of an input, or that were read at the offsets of
one version from another. So:

- :func:`read_header` records the identity of the version whose header it
  parsed, from the descriptor it parsed it through: ``(st_dev, st_ino,
  st_size, st_mtime_ns, st_ctime_ns)`` and the sha256 of the 8-byte prefix and
  the header JSON. Every :class:`TensorEntry` it makes carries it, so the plan
  (plain data) takes it to every worker, Ray actors included.
- Readers (``block_io``) check their descriptor's ``fstat`` against it on
  every use (:meth:`FileIdentity.differs`) and keep reading through that
  descriptor: a path that now names another file is never reopened under the
  old plan's offsets (and the descriptor itself then tells: the file it reads
  lost its name, which moved its ctime).
- Before publishing, the driver re-stats every input path and re-reads its
  header (:func:`recheck`): any difference fails the merge naming the file.

ctime cannot be set from user space: a same-size, same-mtime rewrite moves
it, an atomic replace moves the inode. A change of metadata alone (chmod,
chown, a new hard link) moves ctime too and counts as a change. What is not
seen: a write within the same tick of the kernel's coarse clock as the
file's last change before the plan (a few milliseconds at most), and a
filesystem that reports no stable inode numbers or ctimes.

Device numbers: a shared filesystem's ``st_dev`` is given per mount, so it
differs between the nodes of a cluster while its inode numbers and times come
from the server. Readers (which may run on any node) and ``--resume`` (which
may run on another node) therefore compare ``(st_ino, st_size, st_mtime_ns,
st_ctime_ns)`` and the header digest; the driver's check before publishing,
made on the node and in the process that planned, compares ``st_dev`` too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from dataclasses import dataclass

__all__ = ["FileIdentity", "recheck"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FileIdentity:
    """One version of one input file (plain data: it travels with the plan)."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    header_len: int  # the 8-byte prefix and the JSON
    header_sha256: str

    @classmethod
    def of(cls, path: str, st: os.stat_result, header: bytes, *more: bytes) -> FileIdentity:
        """The identity of the file ``st`` describes, whose first bytes are ``header``
        (followed by those of ``more``: pieces read apart are not joined, which
        for the header of a million tensors is a copy of ~75 MB)."""
        digest = hashlib.sha256(header)
        for piece in more:
            digest.update(piece)
        return cls(
            path=path,
            dev=st.st_dev,
            ino=st.st_ino,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            header_len=len(header) + sum(len(p) for p in more),
            header_sha256=digest.hexdigest(),
        )

    def differs(self, st: os.stat_result, *, dev: bool = False) -> str | None:
        """What tells the file ``st`` describes from this version, or None.

        ``dev``: compare the device number too (only where the comparison is made
        on the node that recorded the identity: see the module's docstring).
        """
        if st.st_nlink == 0:  # (an open descriptor's file: the unlink moved its ctime)
            return "deleted or replaced by another file (the version read has no name left)"
        if st.st_ino != self.ino or (dev and st.st_dev != self.dev):
            return (
                f"replaced by another file (inode {self.dev}:{self.ino} -> {st.st_dev}:{st.st_ino})"
            )
        if st.st_size != self.size:
            return f"size changed ({self.size} -> {st.st_size} bytes)"
        if st.st_mtime_ns != self.mtime_ns:
            return f"modified (mtime {self.mtime_ns} -> {st.st_mtime_ns} ns)"
        if st.st_ctime_ns != self.ctime_ns:
            return (
                "rewritten in place or its metadata changed (ctime moved; size and "
                "mtime kept, as cp -p, rsync -t or a utime back to the old mtime leave them)"
            )
        return None

    def resume_key(self) -> dict:
        """What ``--resume`` compares (no device number: see the module's docstring)."""
        return {
            "ino": self.ino,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
            "header_sha256": self.header_sha256,
        }


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read exactly ``size`` bytes or fewer at EOF; loops on short reads."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recheck(identity: FileIdentity) -> str | None:
    """Re-stat ``identity.path`` and re-read its header: what changed, or None.

    Made by the process that planned, so the device number is compared too.
    """
    try:
        fd = os.open(identity.path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "?")
        return f"cannot be opened any more: {exc.strerror or exc} ({code})"
    try:
        why = identity.differs(os.fstat(fd), dev=True)
        if why is not None:
            return why
        # (hashed piece by piece: the header of a million tensors is ~75 MB)
        digest = hashlib.sha256()
        got = 0
        head = b""
        while got < identity.header_len:
            piece = pread_exact(fd, min(_RECHECK_PIECE, identity.header_len - got), got)
            if not piece:
                break
            if not got:
                head = piece[:8]
            digest.update(piece)
            got += len(piece)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "?")
        return f"cannot be read any more: {exc.strerror or exc} ({code})"
    finally:
        os.close(fd)
    if got < 8 or 8 + struct.unpack("<Q", head[:8])[0] != identity.header_len:
        return "its header changed (another length)"
    if got != identity.header_len or digest.hexdigest() != identity.header_sha256:
        return "its header changed"
    return None


_RECHECK_PIECE = 2**20
