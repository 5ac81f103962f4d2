"""Whether anyone but this user and root could change what a directory holds.

The rule is sshd's StrictModes, as it has it for ``~/.ssh``: the directory is
owned by the daemon's effective uid or root and writable by nobody else, and
every directory above it is owned by one of those two and writable by nobody
else unless it is sticky (``/tmp``: others may add entries there but not
rename ours).  Both the path as given and its symlinks resolved are checked,
so a symlink cannot lead around the rule.  A directory the daemon created
itself (mode 0700) passes by construction.

The socket directory (whoever could write there could bind an impostor that
clients trust) and the state directory (whoever could write there could
replace the database the daemon restores) are held to it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Distrust", "distrust", "refusal"]

#: Group and world write bits.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True, slots=True)
class Distrust:
    """Why ``place`` (the directory itself, or one above it) is not safe.

    Exactly one of ``owner`` (another uid owns it) and ``mode`` (others may
    write it: its permission bits) is set.
    """

    place: Path
    itself: bool
    owner: int | None = None
    mode: int | None = None


def distrust(directory: Path) -> Distrust | None:
    """The first reason not to trust ``directory``, or None.

    Raises OSError (its ``filename`` the path that could not be examined).
    """
    trusted = (os.geteuid(), 0)
    absolute = Path(os.path.abspath(directory))
    real = Path(os.path.realpath(directory))
    for place in sorted(_components(absolute) | _components(real)):
        st = os.lstat(place)
        itself = place in (real, absolute)
        if st.st_uid not in trusted:
            return Distrust(place, itself, owner=st.st_uid)
        if stat.S_ISLNK(st.st_mode):
            continue  # its target is checked as part of the resolved path
        sticky = bool(st.st_mode & stat.S_ISVTX) and not itself
        if st.st_mode & _OTHERS_WRITE and not sticky:
            return Distrust(place, itself, mode=stat.S_IMODE(st.st_mode))
    return None


def _components(path: Path) -> set[Path]:
    """``path`` and every directory above it."""
    return {path, *path.parents}


def refusal(directory: Path, *, kind: str, asset: str, option: str) -> str | None:
    """Why ``directory`` (a ``kind``, such as "state directory") is refused, in
    words that say what is at stake (``asset``) and what to do (``option``), or None.

    Raises OSError as :func:`distrust` does.
    """
    found = distrust(directory)
    if found is None:
        return None
    what = f"{kind} {directory}" if found.itself else f"{found.place}, above {kind} {directory},"
    if found.owner is not None:
        return (f"{what} is owned by uid {found.owner}, not by this user (uid {os.geteuid()}) "
                f"or root, so its owner could replace {asset}; choose another {option}")
    return (f"{what} is writable by others (mode {found.mode:04o}), so they could replace "
            f"{asset}; chmod go-w {found.place}, or choose another {option}")
