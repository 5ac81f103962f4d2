"""Whether the process that answers at ``--qemu`` may be taken for QEMU.

migblockd connects to a path and believes what answers there: QEMU's blockers,
its migration's status and events go to every client, and the commands it
forwards (``migrate`` and its URI, ``qemu-passthrough``'s, HMP command lines
with their passwords included) go to it.  While QEMU is away (restarted, not
started yet), its socket file is gone, and whoever may write the directory can
bind one of their own there: in ``/tmp``, which is sticky, that is every local
user.  The kernel names the listener (``SO_PEERCRED``), so the rule is the one
the socket and state directories are held to (:mod:`migblockd.trust`), with
QEMU's user trusted as well: a listener that is neither root nor migblockd's
user is taken for QEMU only where no one but root, migblockd's user and the
listener's user could have put a socket (as libvirt's per-domain directories
are).  Root's and migblockd's own user's listeners are trusted anywhere: nobody
else can run as them.
"""

from __future__ import annotations

import os
from pathlib import Path

from migblockd.databases import named
from migblockd.trust import distrust

__all__ = ["untrusted_listener"]


def untrusted_listener(path: Path, uid: int | None) -> str | None:
    """Why the listener at ``path``, of ``uid`` (``SO_PEERCRED``; None: not
    reported), is not taken for QEMU; None when it is.  On the event loop: users are
    named as known by now, never looked up (a user database may hang)."""
    if uid is not None and uid in (0, os.geteuid()):
        return None
    if uid is None:
        return (f"the kernel did not say which user listens at {path}, so it cannot be "
                "told from another user's socket put there while QEMU was away")
    directory = Path(os.path.abspath(path)).parent
    try:
        found = distrust(directory, owner=uid)
    except OSError as exc:
        return f"{exc.filename or directory} cannot be examined ({exc.strerror})"
    if found is None:
        return None
    why = (f"belongs to {named(found.owner)}" if found.owner is not None
           else f"others may write to it (mode {found.mode:04o})")
    return (f"what listens there runs as {named(uid)}, and {found.place} {why}, so another "
            f"user could have put that socket there while QEMU was away: migblockd takes "
            f"a listener that is neither root nor its own user for QEMU only in a "
            f"directory that no one but root, migblockd's user and QEMU's user may write; "
            f"put QEMU's -qmp socket in such a directory")
