"""What the daemon needs of a ``--schema`` beyond QEMU's rules.

``migblockd-qapi-gen`` takes any schema of its QAPI subset (docs/schema.md) that
QEMU's generator would take too, whatever its commands.  The daemon
serves only one that has an enum ``MigMode`` holding ``normal`` (the mode a
migration is in until ``migrate-set-parameters`` changes it, QEMU's default)
and whose commands are all ones it has a handler for
(:data:`migblockd.commands.HANDLED`).  Checked before anything binds, a schema
that falls short stops the start with one line, ``FILE:LINE:COL: message``
where there is a definition to point at, as a mistake in the schema does;
unchecked, it was a traceback at the start or an internal error at each call
of the command.
"""

from __future__ import annotations

from migblockd.commands import has_handler
from migblockd.contract import Contract
from migblockd.qapi.error import QAPIError
from migblockd.registry import DEFAULT_MODE
from migblockd.startup import NotConfigured

__all__ = ["MIG_MODE", "check_served"]

#: The enum whose values are the migration modes blockers block.
MIG_MODE = "MigMode"


def check_served(contract: Contract) -> None:
    """StartupError (``bad schema: ...``) when the daemon cannot serve ``contract``."""
    modes = contract.enums.get(MIG_MODE)
    where = contract.sources.get(MIG_MODE)
    if where is None:
        raise NotConfigured(f"bad schema: {contract.root}: enum '{MIG_MODE}' is not defined; "
                           "migblockd takes the migration modes from it")
    if modes is None:
        _refuse(QAPIError(where, f"'{MIG_MODE}' must be an enum (of the migration modes)"))
    elif DEFAULT_MODE not in modes:
        _refuse(QAPIError(where, f"enum '{MIG_MODE}' lacks value '{DEFAULT_MODE}', the mode "
                                 "of a migration until migrate-set-parameters sets another"))
    for name in contract.commands:
        if not has_handler(name):
            _refuse(QAPIError(contract.sources[name],
                              f"migblockd has no handler for command '{name}'"))


def _refuse(error: QAPIError) -> None:
    raise NotConfigured(f"bad schema: {error}")
