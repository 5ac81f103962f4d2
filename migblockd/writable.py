"""What this process's user may make or write, told before trying.

``--check-config`` (and a reload's check of the next start) must say what the
start would, without making, opening or binding anything: whether ``mkdir``,
``open`` or ``bind`` in a directory would fail for want of permission, or on a
read-only file system.  ``access(2)`` with the effective ids answers as those
calls would, for this user; root, checking for a daemon that runs as another
user, cannot play that user, and leaves it to the start.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["denied", "first_missing"]


def denied(place: Path, access: int) -> int:
    """The errno that opening or making something in ``place`` with ``access``
    (``os.W_OK | os.X_OK`` for a directory to make an entry in) would fail with
    for this process's user; 0 when none can be told beforehand."""
    try:
        if access & os.W_OK and os.statvfs(place).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError:
        return 0
    return 0 if os.access(place, access, effective_ids=True) else errno.EACCES


def first_missing(directory: Path) -> Path:
    """The first directory ``mkdir -p directory`` would make (``directory``
    itself when its parent exists); ``directory`` need not be missing."""
    first = directory
    for parent in directory.parents:
        if os.path.lexists(parent):
            break
        first = parent
    return first
