"""Committed generated files: read what is there, diff it against a fresh generation, write.

The JSON Schemas (``migblockd-qapi-gen``) and the man pages and completion scripts
(``python -m migblockd.share``) are both committed and both checked for staleness the
same way: a generator owns the files its ``patterns`` match under a directory, and
nothing else there.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

__all__ = ["diffs", "existing", "write"]


def existing(directory: Path, patterns: Sequence[str]) -> dict[str, str]:
    """The files under ``directory`` a generator owns: ``{relative path: text}``."""
    found: dict[str, str] = {}
    if not directory.is_dir():
        return found
    for pattern in patterns:
        for path in sorted(directory.glob(pattern)):
            if path.is_file():
                # Decoded from bytes: read_text() would turn CRLF into LF, and a
                # file converted to CRLF would then pass for fresh.
                found[path.relative_to(directory).as_posix()] = path.read_bytes().decode(
                    "utf-8", errors="replace")
    return dict(sorted(found.items()))


def diffs(files: dict[str, str], directory: Path, patterns: Sequence[str]) -> list[str]:
    """Unified diffs (committed -> fresh) of every file that differs."""
    old_files = existing(directory, patterns)
    out = []
    for rel in sorted(set(files) | set(old_files)):
        old, new = old_files.get(rel), files.get(rel)
        if old != new:
            out.append("".join(_marked(difflib.unified_diff(
                (old or "").splitlines(keepends=True), (new or "").splitlines(keepends=True),
                fromfile=f"a/{rel}" if old is not None else "/dev/null",
                tofile=f"b/{rel}" if new is not None else "/dev/null"))))
    return out


def _marked(lines: Iterable[str]) -> Iterator[str]:
    """Diff lines as ``diff -u`` and ``git diff`` write them: a file's last line with
    no newline is followed by a marker that says so, so that patch(1) can apply it
    and the change stays visible."""
    for line in lines:
        if line.endswith("\n"):
            yield line
        else:
            yield line + "\n\\ No newline at end of file\n"


def write(files: dict[str, str], directory: Path, patterns: Sequence[str]) -> None:
    """Write ``files``; delete the owned files no longer generated; leave the rest alone."""
    for rel in existing(directory, patterns):
        if rel not in files:
            (directory / rel).unlink()
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        # Bytes, not text: a committed file that is not UTF-8 (saved as UTF-16 by an
        # editor, say) is stale like any other, and is replaced, not decoded.
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
