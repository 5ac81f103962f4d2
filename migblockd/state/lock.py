"""One daemon per state directory: a :class:`~migblockd.pidlock.PidLock` on ``DIRECTORY/lock``.

SQLite's own locks are not enough: two daemons could both read the same state
and then take turns writing.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from migblockd.pidlock import Held, LockFailed, PidLock
from migblockd.state.errors import StateError, owner_mismatch

__all__ = ["LOCK_NAME", "lock_directory"]

LOCK_NAME = "lock"


def lock_directory(directory: Path) -> PidLock:
    """The state directory's lock, or :class:`StateError` saying why not."""
    path = directory / LOCK_NAME
    try:
        return PidLock.acquire(path)
    except Held as held:
        raise StateError(f"state directory {directory} is locked by another migblockd "
                         f"({held.holder}); stop it, or use another --state-dir") from None
    except LockFailed as exc:
        if exc.opening and path.is_symlink():
            raise StateError(f"{path} is a symbolic link, which migblockd never follows; "
                             "remove it (the daemon makes its lock file itself)") from None
        if exc.opening and path.exists() and not path.is_file():
            raise StateError(f"{path} is not a regular file; remove it "
                             "(the daemon makes its lock file itself)") from None
        if exc.opening and exc.errno == errno.EACCES and path.is_file():
            # The file is in the way, not the directory: say so, and whose it is
            # (a directory chowned to the daemon's user without -R, say).
            raise StateError(f"cannot open {path}: {exc.strerror} ({_whose(path)}, or "
                             "choose another --state-dir") from None
        if exc.opening:
            raise StateError(f"cannot open {path}: {exc.strerror}; make {directory} writable "
                             "by this user, or choose another --state-dir") from None
        raise StateError(f"cannot lock {path}: {exc.strerror}; "
                         "choose another --state-dir") from None


def _whose(path: Path) -> str:
    """Why this user may not open the lock file ``path``, and the command that fixes it."""
    st = path.stat()
    if st.st_uid == os.geteuid():
        return f"mode {stat.S_IMODE(st.st_mode):04o}); chmod u+rw {path}"
    held, fix = owner_mismatch(path, st)
    return f"{held}); {fix}"
