"""Whether anyone but root and the daemon's user could have written a file it obeys.

sshd's StrictModes, for the files that decide what the daemon does: the
``--config`` file (its owner sets the log level, the socket's mode and the
limits) and a ``--schema`` with the files it includes (its owner sets the
commands served, their arguments and the migration modes).  Such a file must
be owned by root or the daemon's effective uid and writable by nobody else:
under an access ACL (acl(5)) by its entries, as :func:`migblockd.trust.writers`
reads a directory's, since the mode's group bits are then only the ACL's mask.
The schema installed with migblockd is not judged: it is part of the
installed code, whose owner owns the daemon anyway.

The caller passes the opened file's descriptor and status
(``regular.read_regular``'s ``vet``), and the ACL is read from that
descriptor, so the file judged is the file read.  Its path is held to the
directory rule (:mod:`migblockd.trust`) too, as StrictModes checks the
directories above ``authorized_keys``: whoever may write a directory on the
way, or owns a symlink there, could put any root-owned file in its place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from migblockd.options import ConfigError
from migblockd.resolver import group_name, who
from migblockd.trust import distrust, refusal, writers, writers_named

__all__ = ["UntrustedFile", "check_trusted"]


class UntrustedFile(ConfigError):
    """The file could have been written by someone the daemon does not trust;
    ``str()`` says who owns it or its mode, and what to run."""


def check_trusted(path: str | os.PathLike[str], fd: int, st: os.stat_result, what: str,
                  decides: str) -> None:
    """Refuse ``path`` (opened as ``fd``, whose status is ``st``) when anyone but root
    and this user could have written it, or could put another file at its path.

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
    # Read from the descriptor: by name, it could be another file's by now.
    entries = writers(fd, st, (0, uid))
    if entries:
        # chmod go-w would take the write from the trusted users' entries too, and
        # setfacl without -n would recompute the mask from every entry.
        fix = ",".join(each.without_write for each in entries)
        raise UntrustedFile(f"{name}: refusing a {what} with an ACL that lets "
                            f"{writers_named(entries, who, group_name)} write to it (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}, whose group bits are the ACL's "
                            f"mask); setfacl -n -m {fix} {name}")
    if entries is None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFile(f"{name}: refusing a {what} others may write (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w {name}")
