"""``migrate``'s ``channels`` end to end through the real daemon (simulated migrations).

A channel's ``addr`` is QEMU's ``MigrationAddress`` (``qapi/migration.json``), a
union on ``transport`` whose ``socket`` branch is ``SocketAddress``
(``qapi/sockets.json``), a union on ``type``: its members are judged as QEMU's
QAPI visitor judges them, before anything ``qmp_migrate()`` checks.  Then come
``qmp_migrate()``'s checks in QEMU master's order: ``uri`` or ``channels``, the
channels' types (``migrate_channels_parse()``, ``migration/channel.c``), the URI's
scheme (``migrate_uri_parse()``), the transport (``migration_transport_compatible()``,
``migration/migration.c``), and only then ``migrate_prepare()``'s (a running
migration, the blockers).  Every refusal leaves the migration state as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log
from qemu_strings import GENERIC, SEV, error
from qmpclient import RawClient

UNIX = {"transport": "socket", "type": "unix", "path": "/run/dst.sock"}
FILE = {"transport": "file", "filename": "/var/lib/vm.state", "offset": 0}
NEED = "need either 'uri' or 'channels' argument"
NO_CPR = "missing 'cpr' migration channel"
NO_MAIN = "Channel list has no main entry"
STREAMABLE = "Migration requires streamable transport (eg unix)"


def ch(kind: str, addr: object) -> dict[str, Any]:
    return {"channel-type": kind, "addr": addr}


def addr_error(what: str) -> str:
    return what.replace("ADDR", "channels[0].addr")


REFUSED: list[tuple[dict[str, Any], str]] = [
    # The address, as QEMU's visitor takes it: the discriminators first.
    ({"channels": [ch("main", None)]},
     addr_error("Invalid parameter type for 'ADDR', expected: object")),
    ({"channels": [ch("main", "unix:/run/dst.sock")]},
     addr_error("Invalid parameter type for 'ADDR', expected: object")),
    ({"channels": [ch("main", {})]}, addr_error("Parameter 'ADDR.transport' is missing")),
    ({"channels": [ch("main", {"path": "/x", "type": "unix"})]},
     addr_error("Parameter 'ADDR.transport' is missing")),
    ({"channels": [ch("main", {"transport": 1})]},
     addr_error("Invalid parameter type for 'ADDR.transport', expected: string")),
    ({"channels": [ch("main", {"transport": "tcp", "host": "h", "port": "1"})]},
     addr_error("Parameter 'ADDR.transport' does not accept value 'tcp'")),
    ({"channels": [ch("main", {"transport": "socket", "path": "/x"})]},
     addr_error("Parameter 'ADDR.type' is missing")),
    ({"channels": [ch("main", {"transport": "socket", "type": "tcp"})]},
     addr_error("Parameter 'ADDR.type' does not accept value 'tcp'")),
    # Then each branch's members, in QEMU's order.
    ({"channels": [ch("main", {"transport": "socket", "type": "inet", "port": "1"})]},
     addr_error("Parameter 'ADDR.host' is missing")),
    ({"channels": [ch("main", {"transport": "socket", "type": "inet", "host": "h"})]},
     addr_error("Parameter 'ADDR.port' is missing")),
    ({"channels": [ch("main", {"transport": "socket", "type": "inet", "host": "h",
                               "port": 4444})]},
     addr_error("Invalid parameter type for 'ADDR.port', expected: string")),
    ({"channels": [ch("main", {"transport": "socket", "type": "inet", "host": "h",
                               "port": "1", "to": 65536})]},
     addr_error("Parameter 'ADDR.to' expects uint16_t")),
    ({"channels": [ch("main", {"transport": "socket", "type": "inet", "host": "h",
                               "port": "1", "keep-alive": "yes"})]},
     addr_error("Invalid parameter type for 'ADDR.keep-alive', expected: boolean")),
    ({"channels": [ch("main", {"transport": "socket", "type": "unix"})]},
     addr_error("Parameter 'ADDR.path' is missing")),
    ({"channels": [ch("main", {"transport": "socket", "type": "vsock", "port": "1"})]},
     addr_error("Parameter 'ADDR.cid' is missing")),
    ({"channels": [ch("main", {"transport": "socket", "type": "fd", "fd": "3"})]},
     addr_error("Parameter 'ADDR.str' is missing")),
    ({"channels": [ch("main", {"transport": "exec"})]},
     addr_error("Parameter 'ADDR.args' is missing")),
    ({"channels": [ch("main", {"transport": "exec", "args": "true"})]},
     addr_error("Invalid parameter type for 'ADDR.args', expected: array")),
    ({"channels": [ch("main", {"transport": "exec", "args": ["sh", 1]})]},
     addr_error("Invalid parameter type for 'ADDR.args[1]', expected: string")),
    ({"channels": [ch("main", {"transport": "rdma", "host": "h"})]},
     addr_error("Parameter 'ADDR.port' is missing")),
    ({"channels": [ch("main", {"transport": "file", "filename": "/f"})]},
     addr_error("Parameter 'ADDR.offset' is missing")),
    ({"channels": [ch("main", {"transport": "file", "filename": "/f", "offset": "0"})]},
     addr_error("Parameter 'ADDR.offset' expects uint64")),
    # A member no branch of the address knows, once the others are judged.
    ({"channels": [ch("main", {**UNIX, "host": "h"})]},
     addr_error("Parameter 'ADDR.host' is unexpected")),
    ({"channels": [ch("main", {"transport": "rdma", "type": "inet", "host": "h",
                               "port": "1"})]},
     addr_error("Parameter 'ADDR.type' is unexpected")),
    ({"channels": [ch("main", {**FILE, "args": ["true"]})]},
     addr_error("Parameter 'ADDR.args' is unexpected")),
    # The visitor judges every address before qmp_migrate() looks at anything.
    ({"uri": "tcp:h:1", "channels": [ch("main", {})]},
     addr_error("Parameter 'ADDR.transport' is missing")),
    ({"channels": [ch("main", UNIX), ch("main", {"transport": "exec"})]},
     "Parameter 'channels[1].addr.args' is missing"),
    ({"channels": [ch("cpr", {**UNIX, "tight": 1})]},
     addr_error("Invalid parameter type for 'ADDR.tight', expected: boolean")),
    # Then qmp_migrate(): uri or channels, then the channels' types, or the URI's scheme.
    ({"uri": "tcp:h:1", "channels": [ch("main", UNIX)]}, NEED),
    ({"channels": []}, NEED),
    ({"resume": False}, NEED),
    ({"channels": [ch("main", UNIX), ch("main", FILE)]},
     "Channel list has more than one main entry"),
    ({"channels": [ch("cpr", UNIX), ch("main", UNIX), ch("cpr", UNIX), ch("main", UNIX)]},
     "Channel list has more than one cpr entry"),
    ({"channels": [ch("cpr", UNIX)]}, NO_MAIN),
    ({"uri": "ftp://h/x"}, "unknown migration protocol: ftp://h/x"),
    ({"uri": "Unix:/x"}, "unknown migration protocol: Unix:/x"),
]


@pytest.mark.parametrize(("arguments", "desc"), REFUSED)
async def test_refused_channels(module_daemon: DaemonProcess, arguments: dict[str, Any],
                                desc: str) -> None:
    async with module_daemon.client() as c:
        before = await c.ok("query-migrate")
        assert await c.execute("migrate", arguments, id="m") == error(GENERIC, desc, "m")
        assert await c.ok("query-migrate") == before


VALID = [
    {"transport": "socket", "type": "inet", "host": "10.0.0.2", "port": "4444"},
    {"transport": "socket", "type": "inet", "host": "::1", "port": "4444", "numeric": True,
     "to": 4450, "ipv4": False, "ipv6": True, "keep-alive": True, "keep-alive-count": 3,
     "keep-alive-idle": 30, "keep-alive-interval": 5, "mptcp": False},
    UNIX,
    {**UNIX, "abstract": True, "tight": False},
    {"transport": "socket", "type": "vsock", "cid": "3", "port": "4444"},
    {"transport": "socket", "type": "fd", "str": "migfd"},
    {"transport": "exec", "args": ["/bin/sh", "-c", "cat > /dev/null"]},
    {"transport": "rdma", "host": "10.0.0.2", "port": "4444"},
    {**FILE, "offset": 2**64 - 1},
]


async def migrates(c: RawClient, arguments: dict[str, Any]) -> None:
    assert await c.execute("migrate", arguments, id="ok") == {"id": "ok", "return": {}}
    assert (await c.ok("query-migrate"))["status"] == "setup"
    assert await c.ok("migrate_cancel") == {}


async def test_every_transport_qemu_takes_starts_a_migration(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("--migration-time", "60")
    async with d.client() as c:
        for addr in VALID:
            await migrates(c, {"channels": [ch("main", addr)]})
        # A cpr channel beside the main one is taken in every mode.
        await migrates(c, {"channels": [ch("cpr", VALID[4]), ch("main", VALID[0])]})
        # Addresses are judged before the migration in progress is.
        await c.ok("migrate", {"channels": [ch("main", UNIX)]})
        assert await c.execute("migrate", {"channels": [ch("main", {})]}) == error(
            GENERIC, "Parameter 'channels[0].addr.transport' is missing")
        assert (await c.execute("migrate", {"channels": [ch("main", UNIX)]}))["error"][
            "desc"] == "There's a migration process in progress"
    assert d.stop() == 0
    assert_clean_log(d)


async def test_cpr_transfer_checks_in_qemu_masters_order(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("--migration-time", "60")
    async with d.client() as c:
        await c.ok("migrate-set-parameters", {"mode": "cpr-transfer"})
        await c.ok("add-blocker", {"reason": SEV, "id": "sev", "modes": ["cpr-transfer"]})
        cases: list[tuple[dict[str, Any], str]] = [
            # migrate_channels_parse(): duplicates, then the cpr channel, then the main one.
            ({"channels": [ch("main", UNIX), ch("main", UNIX)]},
             "Channel list has more than one main entry"),
            ({"channels": [ch("main", FILE)]}, NO_CPR),
            ({"channels": [ch("main", UNIX)]}, NO_CPR),
            ({"channels": [ch("cpr", UNIX)]}, NO_MAIN),
            # migration_transport_compatible(): the main stream cannot go to a file.
            ({"channels": [ch("main", FILE), ch("cpr", UNIX)]}, STREAMABLE),
            # A URI: its scheme, the transport, then (QEMU 10.x) the cpr channel.
            ({"uri": "bogus"}, "unknown migration protocol: bogus"),
            ({"uri": "file:/var/lib/vm.state"}, STREAMABLE),
            ({"uri": "unix:/run/dst.sock"}, NO_CPR),
            # Then migrate_prepare(): the blocker.
            ({"channels": [ch("main", UNIX), ch("cpr", UNIX)]}, SEV),
        ]
        for arguments, desc in cases:
            assert await c.execute("migrate", arguments, id="m") == error(
                GENERIC, desc, "m"), arguments
            assert await c.ok("query-migrate") == {"blocked-reasons": [SEV]}
        await c.ok("del-blocker", {"id": "sev"})
        await migrates(c, {"channels": [ch("cpr", UNIX), ch("main", UNIX)]})
    assert d.stop() == 0
    assert_clean_log(d)
