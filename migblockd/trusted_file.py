"""Whether anyone but root and the daemon's user could have written a file it obeys.

sshd's StrictModes, for the files that decide what the daemon does: the
``--config`` file (its owner sets the log level, the socket's mode and the
limits) and a ``--schema`` with the files it includes (its owner sets the
commands served, their arguments and the migration modes).  Such a file must
be owned by root or the daemon's effective uid and writable by nobody else.
The schema installed with migblockd is not judged: it is part of the
installed code, whose owner owns the daemon anyway.

The caller passes the opened file's own status (``regular.read_regular``'s
``vet``), so the file judged is the file read.  Its path is held to the
directory rule (:mod:`migblockd.trust`) too, as StrictModes checks the
directories above ``authorized_keys``: whoever may write a directory on the
way, or owns a symlink there, could put any root-owned file in its place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from migblockd.options import ConfigError
from migblockd.resolver import who
from migblockd.trust import distrust, refusal

__all__ = ["UntrustedFile", "check_trusted"]


class UntrustedFile(ConfigError):
    """The file could have been written by someone the daemon does not trust;
    ``str()`` says who owns it or its mode, and what to run."""


def check_trusted(path: str | os.PathLike[str], st: os.stat_result, what: str,
                  decides: str) -> None:
    """Refuse ``path`` (its status ``st``) when anyone but root and this user could
    have written it, or could put another file at its path.

    ``what`` names the file in the refusal (``configuration file``), ``decides``
    what its owner would decide (``the daemon's settings``).

    Raises OSError when the path cannot be examined.
    """
    uid = os.geteuid()
    name = os.fspath(path)
    found = distrust(Path(name))
    # The file itself (the walk's last place) is judged below, on the status of the
    # file opened: what distrust says of it is said there, in a file's words.
    if found is not None and not found.itself:
        refused = refusal(Path(name), kind=what, asset=f"it and so set {decides}",
                          option="place for it")
        if refused is not None:
            raise UntrustedFile(refused)
    if st.st_uid not in (0, uid):
        # Said with names and the fix: at 3 a.m. "uid 1000" alone leaves both to find.
        owners = "root" if uid == 0 else f"root or the daemon's user, {who(uid)},"
        raise UntrustedFile(f"{name}: refusing a {what} owned by {who(st.st_uid)}: only "
                            f"{owners} may own it, since its owner sets {decides}; "
                            f"chown root {name}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFile(f"{name}: refusing a {what} others may write (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w {name}")
