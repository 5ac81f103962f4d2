"""QEMU's exact words, shared by the integration tests: error classes, real blocker
reasons, the migration modes, and the shape of an error reply.

The reasons are texts from QEMU's own ``migrate_add_blocker()`` call sites
(``include/migration/blocker.h``), so the tests exercise the daemon with what real
clients send.
"""

from __future__ import annotations

from typing import Any

GENERIC = "GenericError"
NOT_FOUND = "CommandNotFound"

#: MigMode's members, in schema order.
ALL_MODES = ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]

VMDK = "The vmdk format used by node 'disk0' does not support live migration"
VHOST = "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature."
VFIO = "0000:01:00.0: Migration is disabled for VFIO device"
INVTSC = "State blocked by non-migratable CPU device (invtsc flag)"
SEV = "SEV: Migration is not implemented"
TPM = "Migration disabled: TPM emulator does not support migration"
DUMP = "Live migration disabled: dump-guest-memory in progress"
CPR_RAM = ("Memory region pc.ram is not compatible with CPR. share=on is required for "
           "memory-backend objects, and aux-ram-share=on is required.")
MDEV = "CPR does not support vfio mdev 0000:02:00.0"

#: What the simulation reports besides ``mode`` in query-migrate-parameters: QEMU's defaults.
DEFAULT_PARAMETERS = {"max-bandwidth": 134217728, "downtime-limit": 300}

#: ``error(..., id=NO_ID)`` is a reply without an ``id`` member (``None`` is a valid id).
NO_ID = object()


def error(cls: str, desc: str, id: Any = NO_ID) -> dict[str, Any]:
    """The exact error reply, member for member."""
    reply: dict[str, Any] = {} if id is NO_ID else {"id": id}
    reply["error"] = {"class": cls, "desc": desc}
    return reply
