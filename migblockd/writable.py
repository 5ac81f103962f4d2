"""What this process's user may make or write, told before trying.

``--check-config`` (and a reload's check of the next start) must say what the
start would, without making, opening or binding anything: whether ``mkdir``,
``open`` or ``bind`` in a directory would fail for want of permission, or on a
read-only file system.  ``access(2)`` with the effective ids answers as those
calls would, for this user; root, checking for a daemon that runs as another
user, cannot play that user, and leaves it to the start.

A file or directory marked immutable (``chattr +i``) refuses every write with
``EPERM``, root's too, and an append-only one (``chattr +a``) every removal
and rename: no mode or owner explains that, so the messages name the attribute
(:func:`attribute_fix`).

Nor does a mode explain procfs (``/proc``): root may write its directories by their
mode, on a file system mounted read-write, yet no name can be made there, as its
lookup of a name it does not have fails (``ENOENT``) before any permission or
create is looked at (``proc_root_lookup()`` and the like in the kernel's fs/proc/).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

__all__ = ["attribute", "attribute_fix", "denied", "first_missing", "in_the_way"]

#: ioctl(2) request for a file's inode flags (``lsattr``): FS_IOC_GETFLAGS.
_FS_IOC_GETFLAGS = 0x80086601
#: The flags that refuse writes whatever the mode: (bit, name, chattr letter, what it
#: stops in a directory, in a file).
_ATTRIBUTES = (
    (0x10, "immutable", "i", "from changing it", "from changing it"),
    (0x20, "append-only", "a", "from removing or renaming anything in it",
     "from writing it anywhere but at its end"),
)


def denied(place: Path, access: int) -> int:
    """The errno that opening or making something in ``place`` with ``access``
    (``os.W_OK | os.X_OK`` for a directory to make an entry in) would fail with
    for this process's user; 0 when none can be told beforehand."""
    if (access & os.W_OK and os.path.isdir(place) and os.access(place, os.X_OK, effective_ids=True)
            and _file_system(place) == "proc"):
        return errno.ENOENT
    try:
        if access & os.W_OK and os.statvfs(place).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError:
        return 0
    if access & os.W_OK and (found := attribute(place)) is not None and (
            found[0] == "immutable" or not os.path.isdir(place)):
        return errno.EPERM  # an append-only file: opened for writing, not appending
    return 0 if os.access(place, access, effective_ids=True) else errno.EACCES


def _file_system(place: Path) -> str | None:
    """The type of the file system ``place`` is on, as ``/proc/self/mountinfo`` names
    it (``proc``); None when that cannot be told."""
    try:
        device = os.stat(place).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in lines:
        # ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
        fields, _, after = line.partition(" - ")
        if fields.split(" ")[2:3] == [wanted] and after:
            return after.split(" ", 1)[0]
    return None


def attribute(place: Path) -> tuple[str, str, str] | None:
    """``place``'s attribute that refuses writes whatever its mode, as (name,
    chattr letter, what it stops): immutable first; None when it has neither,
    or when that cannot be told (not there, not readable, a file system
    without such flags)."""
    try:
        fd = os.open(place, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(4))
    except OSError:
        return None
    finally:
        os.close(fd)
    flags = struct.unpack("I", raw)[0]
    in_dir = os.path.isdir(place)
    return next(((name, letter, in_dir_stops if in_dir else in_file_stops)
                 for bit, name, letter, in_dir_stops, in_file_stops in _ATTRIBUTES
                 if flags & bit), None)


def attribute_fix(place: Path, option: str | None) -> str | None:
    """``PLACE is immutable (chattr +i), which keeps even root from changing it:
    chattr -i PLACE, or choose another OPTION`` (without that last part when
    ``option`` is None); None when ``place`` has no such attribute."""
    found = attribute(place)
    if found is None:
        return None
    name, letter, stops = found
    other = "" if option is None else f", or choose another {option}"
    return (f"{place} is {name} (chattr +{letter}), which keeps even root {stops}: "
            f"chattr -{letter} {place}{other}")


def first_missing(directory: Path) -> Path:
    """The first directory ``mkdir -p directory`` would make (``directory``
    itself when its parent exists); ``directory`` need not be missing."""
    first = directory
    for parent in directory.parents:
        if os.path.lexists(parent):
            break
        first = parent
    return first


def in_the_way(directory: Path) -> Path | None:
    """What is on the way to the missing ``directory`` and is not a directory (a
    file, a link to one or to nothing), under which ``mkdir -p`` cannot make it:
    the start would fail there (ENOTDIR, or EEXIST from ``exist_ok``), so a
    check says so too.  None when nothing is, or the directory exists."""
    if os.path.lexists(directory):
        return None
    blocker = first_missing(directory).parent  # there, as first_missing() looks
    return None if blocker.is_dir() else blocker
