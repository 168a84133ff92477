"""Tar shards read by byte offset: shell-style brace patterns of shard names (``shard-{000000..000099}.tar``),
the one scan of a plain (uncompressed) tar's headers into the byte offsets and sizes of its members, grouped
by WebDataset sample key, and the reads at those offsets (``os.pread``) through a small cache of open files.
What a sample is made of (which members are its image and caption) is ``fdistill.data.captions``'s business."""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

OPEN_FILES = 64  # files kept open per reader (and per process)

# -- brace patterns -------------------------------------------------------------------------------
BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def _range(first: str, last: str) -> list[str]:
    """``{first..last}`` as the shell expands it: inclusive, descending if first > last, zero-padded to the
    wider bound when either bound is written with a leading zero."""
    a, b = int(first), int(last)
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if a <= b else -1
    return [f"{v:0{width}d}" for v in range(a, b + step, step)]


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``shard-{000..002}.tar`` -> shard-000.tar, shard-001.tar, shard-002.tar
    (zero-padded as written), ``{a,b}`` -> a, b; several braces multiply out (left to right). Not nested."""
    depth = 0
    for ch in pattern:
        depth += (ch == "{") - (ch == "}")
        if depth < 0 or depth > 1:
            raise ValueError(f"brace pattern {pattern!r} has unbalanced or nested braces; expected e.g. "
                             "data/shard-{000000..000099}.tar")
    if depth:
        raise ValueError(f"brace pattern {pattern!r} has an unclosed '{{'; expected e.g. data/shard-{{000..099}}.tar")
    m = BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = _RANGE.fullmatch(body)
    if rng:
        items = _range(*rng.groups())
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"brace pattern {pattern!r}: cannot expand {{{body}}}; expected {{first..last}} with "
                         "integers or {a,b,...}")
    return [out for item in items for out in expand_braces(head + item + tail)]


def expand_shards(pattern: str) -> list[Path]:
    """The files a brace pattern names; FileNotFoundError naming the first missing one."""
    paths = [Path(p) for p in expand_braces(pattern)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{pattern}: shard {missing[0]} not found ({len(missing)} of {len(paths)} "
                                "files of the pattern are missing)")
    return paths


# -- indexing -------------------------------------------------------------------------------------
def split_member_name(name: str) -> tuple[str, str] | None:
    """Tar member path -> (key, lower-case extension): the key is the path up to the first dot of the file
    name (``a/b/0001.seg.png`` -> ``a/b/0001``, ``seg.png``). None for hidden files and names without a dot."""
    folder, _, base = name.removeprefix("./").rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _nonzero_after(path: str, offset: int, end: int) -> bool:
    """Whether file ``path`` has a nonzero byte in [offset, end): after a tar's last member comes only the
    zero-filled end-of-archive blocks and padding."""
    with open(path, "rb") as f:
        f.seek(offset)
        while offset < end:
            block = f.read(min(1 << 20, end - offset))
            if not block:
                return False
            if block.count(0) != len(block):
                return True
            offset += len(block)
    return False


def scan_tar(shard: str, end: int, problem: Callable[[str], None]) -> dict[str, dict[str, tuple[int, int]]]:
    """The regular-file members of the plain tar ``shard`` (``end`` bytes long) by sample key and extension:
    ``{key: {ext: (data offset, size)}}``, from one pass over the headers (the data is seeked over). A tar cut
    short after some members, or a corrupt header after them, is reported by ``problem(message)`` and the
    members before it are kept; an unreadable tar is a ValueError."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, "r:") as tf:  # iterating reads the headers and seeks over the data
            try:
                for m in tf:
                    split = split_member_name(m.name) if m.isfile() else None
                    if split is not None:
                        members.setdefault(split[0], {})[split[1]] = (m.offset_data, m.size)
            except tarfile.ReadError as e:  # after some members: the file is cut short
                if not members:
                    raise
                problem(f"{shard}: truncated tar ({e}): the samples after byte {tf.offset}")
            else:
                if _nonzero_after(shard, tf.offset, end):  # tarfile stops silently at a bad header
                    problem(f"{shard}: corrupt tar header at byte {tf.offset}: the samples after it")
    except tarfile.TarError as e:
        raise ValueError(f"{shard} is not a readable tar file ({e}); expected an uncompressed WebDataset "
                         "shard") from e
    return members


# -- reading --------------------------------------------------------------------------------------
class _OpenFile:
    """A read-only file descriptor (for os.pread), closed when the last reference to it goes."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self) -> None:
        with contextlib.suppress(OSError, TypeError):  # already closed, or interpreter shutdown
            os.close(self.fd)


class OffsetReader:
    """Byte ranges of ``files`` (``read(file index, offset, size)``), through the last ``open_files`` files
    kept open; thread-safe, and a forked or unpickled copy opens its own files."""

    def __init__(self, files: Sequence[str], open_files: int = OPEN_FILES) -> None:
        self.files, self.open_files = [str(f) for f in files], open_files
        self._fresh()

    def _fresh(self) -> None:
        self._lock, self._open, self._pid = threading.Lock(), OrderedDict(), os.getpid()

    def read(self, file: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer when the file is shorter than it was)."""
        with self._lock:
            if self._pid != os.getpid():  # a forked worker: open its own files
                self._open, self._pid = OrderedDict(), os.getpid()
            f = self._open.get(file)
            if f is None:
                f = self._open[file] = _OpenFile(self.files[file])
                if len(self._open) > self.open_files:
                    self._open.popitem(last=False)  # closed when no reader holds it any more
            self._open.move_to_end(file)
            if not hasattr(os, "pread"):
                os.lseek(f.fd, offset, os.SEEK_SET)
                return os.read(f.fd, size)
        return os.pread(f.fd, size, offset)

    def __getstate__(self) -> dict:
        return {"files": self.files, "open_files": self.open_files}

    def __setstate__(self, state: dict) -> None:
        self.files, self.open_files = state["files"], state["open_files"]
        self._fresh()
