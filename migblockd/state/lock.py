"""One daemon per state directory: a :class:`~migblockd.pidlock.PidLock` on ``DIRECTORY/lock``.

SQLite's own locks are not enough: two daemons could both read the same state
and then take turns writing.
"""

from __future__ import annotations

from pathlib import Path

from migblockd.pidlock import Held, LockFailed, PidLock
from migblockd.state.errors import StateError

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
        if exc.opening:
            raise StateError(f"cannot open {path}: {exc.strerror}; make {directory} writable "
                             "by this user, or choose another --state-dir") from None
        raise StateError(f"cannot lock {path}: {exc.strerror}; "
                         "choose another --state-dir") from None
