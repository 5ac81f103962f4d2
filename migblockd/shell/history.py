"""Where the interactive shell keeps its history, and a file history that survives
a file it can no longer read or write."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from prompt_toolkit.history import FileHistory, InMemoryHistory


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
    # Each part as it is, not as a link leads: that user's link, there or on the way
    # (the file linked to /etc/sudoers, ~/.local/state linked to a directory of
    # root's), would have root write where that user points it.
    for part in (place, *place.parents):
        try:
            st = os.lstat(part)
        except OSError:
            return None  # making it fails, and says why
        owner = st.st_uid
        if (part == place or stat.S_ISLNK(st.st_mode)) and owner not in (euid, 0):
            return (f"{part} is {_whose(owner)}'s (uid {owner}), not this user's "
                    f"({_whose(euid)}): set XDG_STATE_HOME to a directory of this user's")
    return None


def foreign_file(path: Path) -> str | None:
    """Why an existing history file is read but never written: another user's, or
    one this user may not write (the file is left as it is); None otherwise."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    euid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        return None
    if st.st_uid != euid:
        return (f"{path} is {_whose(st.st_uid)}'s (uid {st.st_uid}), not this user's"
                f" ({_whose(euid)}): set XDG_STATE_HOME to a directory of this user's")
    if not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        return f"{path}: Permission denied"
    return None


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

    def __init__(self, path: Path, warn: Callable[[str], None], *, writable: bool = True
                 ) -> None:
        super().__init__(str(path))
        self._path = path
        self._warn = warn
        #: Once set, nothing more is written (nor said): a failure, or a file that
        #: is read only (:func:`foreign_file`, said when it was opened).
        self._failed = not writable

    def _fail(self, err: OSError) -> None:
        if not self._failed:
            self._failed = True
            self._warn(not_saved(self._path, err))

    def load_history_strings(self) -> Iterable[str]:
        try:
            entries = load_last_entries(self._path, MAX_LOADED)
        except OSError as err:
            self._fail(err)
            return []
        # Too long to recall: written by an earlier version, or by another program.
        return [entry for entry in entries if recallable(entry)]

    def append_string(self, string: str) -> None:
        if recallable(string):
            super().append_string(string)

    def store_string(self, string: str) -> None:
        if self._failed:
            return  # the lines stay in memory (History.append_string keeps them)
        try:
            super().store_string(string)
        except OSError as err:
            self._fail(err)


#: How many entries of the history file are loaded (qmp-shell keeps 1024).
MAX_LOADED = 1000

#: The longest entry kept in the history, in characters.  prompt_toolkit lays a
#: recalled line out whole, and again at each key: 100 KB took a second and a
#: half, a pasted 50 MB line seven minutes, the shell deaf to every key (Ctrl-C,
#: Ctrl-D) meanwhile.  A line this long was pasted, not typed, and is not edited.
MAX_ENTRY = 64 << 10


def recallable(entry: str) -> bool:
    """Whether ``entry`` is short enough to keep in the history (:data:`MAX_ENTRY`)."""
    return len(entry) <= MAX_ENTRY


class SessionMemoryHistory(InMemoryHistory):
    """The history of a shell that keeps none in a file: as
    :class:`SessionFallbackHistory`, no line too long to recall (:data:`MAX_ENTRY`)."""

    def append_string(self, string: str) -> None:
        if recallable(string):
            super().append_string(string)


def _entries(data: bytes) -> list[str]:
    """The entries in ``data``, prompt_toolkit's FileHistory format (each line of
    an entry ``+LINE``; anything else, a ``# date`` line, ends one), oldest first."""
    entries: list[str] = []
    lines: list[str] = []
    # Lines end at line feeds alone, as FileHistory reads them: bytes.splitlines
    # also ends one at a carriage return, which a line typed on a dumb terminal
    # may hold (Ctrl-V Ctrl-M), and the entry was recalled cut there.
    *ended, last = data.split(b"\n")
    for raw in [*(part + b"\n" for part in ended), *([last] if last else [])]:
        line = raw.decode("utf-8", errors="replace")
        if line.startswith("+"):
            lines.append(line[1:])
        elif lines:
            entries.append("".join(lines)[:-1])
            lines = []
    if lines:
        entries.append("".join(lines)[:-1])
    return entries


def load_last_entries(path: Path, limit: int) -> list[str]:
    """The last ``limit`` entries of the history file, newest first, read from
    its end: a history of a hundred megabytes took seconds and as much memory to
    load whole at each start, for entries no one scrolls back to."""
    with open(path, "rb") as file:
        end = file.seek(0, os.SEEK_END)
        size = 1 << 16
        while True:
            start = max(0, end - size)
            file.seek(start)
            data = file.read(end - start)
            if start > 0:
                # From the first line that is not an entry's: what comes before
                # it may be the end of an entry whose start is not read.
                cut = 0
                while True:
                    newline = data.find(b"\n", cut)
                    if newline < 0 or not data.startswith(b"+", newline + 1):
                        break
                    cut = newline + 1
                data = data[newline + 1:] if newline >= 0 else b""
            entries = _entries(data)
            if start == 0 or len(entries) > limit:
                return entries[::-1][:limit]
            size *= 4
