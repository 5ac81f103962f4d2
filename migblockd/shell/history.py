"""Where the interactive shell keeps its history, and a file history that survives
a file it can no longer read or write."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from prompt_toolkit.history import FileHistory


def history_path() -> Path | None:
    """``$XDG_STATE_HOME/migblockd/shell-history``, by default
    ``~/.local/state/migblockd/shell-history`` (the XDG base directory spec says a
    relative ``XDG_STATE_HOME`` is invalid and must be ignored); None for a uid
    with neither, nor a home (no ``$HOME``, no account: a container's bare uid)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):
        return Path(state) / "migblockd" / "shell-history"
    try:
        home = Path.home()
    except RuntimeError:
        return None
    return home / ".local" / "state" / "migblockd" / "shell-history"


def history_problem(path: Path) -> str | None:
    """Why ``path`` (from :func:`history_path`) cannot keep the history, told before
    anything is made or opened; None when only trying can tell.

    A home that does not exist is not made (bash does not make one for its
    history either; ``XDG_STATE_HOME``'s directories are, as the XDG spec asks).
    A FIFO, a device or a socket in the file's place would block the shell on its
    open or feed it without end (``/dev/zero``): only a regular file serves, and
    ``/dev/null``, the usual way to keep no history."""
    if not os.path.isabs(os.environ.get("XDG_STATE_HOME", "")):
        home = path.parents[3]  # HOME/.local/state/migblockd/shell-history
        if not home.is_dir():
            return (f"{home}: the home directory is not a directory" if os.path.lexists(home)
                    else f"{home}: the home directory does not exist")
    try:
        st = os.stat(path)
    except OSError:
        return None
    if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)  # the open says "Is a directory"
            or os.path.samestat(st, os.stat(os.devnull))):
        return None
    return f"{path}: not a regular file"


def _whose(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def foreign_owner(path: Path) -> str | None:
    """Why the shell must make nothing for ``path`` (its directories, the file), or
    None when it may.

    Run as root in another user's home (``su``, ``sudo -E``: ``$HOME`` still
    theirs), the shell would make ``~/.local/state/migblockd`` and the file in
    it root's, 0700, and that user's own daemon could then not keep its state
    there.  So the nearest part of the path that exists (the file, or the
    directory the first missing one would be made in) must be this user's, or
    root's (``/tmp``, ``/var``: a place of the system's, not another user's)."""
    euid = os.geteuid()
    place = path  # the file itself when it exists: another user's is not written either
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent
    try:
        owner = os.stat(place).st_uid
    except OSError:
        return None  # making it fails, and says why
    if owner in (euid, 0):
        return None
    return (f"{place} is {_whose(owner)}'s (uid {owner}), not this user's ({_whose(euid)}):"
            " set XDG_STATE_HOME to a directory of this user's")


def not_saved(path: Path, err: OSError) -> str:
    """The warning that the history goes unsaved for this session, and why."""
    return f"warning: history not saved ({path}: {err.strerror or err})"


class SessionFallbackHistory(FileHistory):
    """A :class:`FileHistory` that, when its file cannot be read or written (a full
    disk, its directory removed, a directory in its place), says so once through
    ``warn`` and keeps the history for the session only.

    prompt_toolkit's own FileHistory lets the OSError out of the key binding that
    accepts the line: each command then printed a traceback and waited for Enter.
    """

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        super().__init__(str(path))
        self._path = path
        self._warn = warn
        self._failed = False

    def _fail(self, err: OSError) -> None:
        if not self._failed:
            self._failed = True
            self._warn(not_saved(self._path, err))

    def load_history_strings(self) -> Iterable[str]:
        try:
            return list(super().load_history_strings())
        except OSError as err:
            self._fail(err)
            return []

    def store_string(self, string: str) -> None:
        if self._failed:
            return  # the lines stay in memory (History.append_string keeps them)
        try:
            super().store_string(string)
        except OSError as err:
            self._fail(err)
