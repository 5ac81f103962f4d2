"""The access guard inside the core, with plain bytes: roles, ownership, quotas, reload, wording.

Clients are numeric uids that no user database names (so refusals show bare
numbers); the policy names them by number.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from migblockd.access import Policy, Quotas, Role
from migblockd.config import Config
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.guard import Guard
from migblockd.registry import FakeClock, Owner, Registry

CONTRACT = Contract.load()
LIMITS = Config().limits
OBSERVER, CLIENT, OPERATOR, ADMIN = 3_999_901, 3_999_902, 3_999_903, 3_999_904
POLICY = Policy.of(Role.CLIENT, {OBSERVER: Role.OBSERVER, OPERATOR: Role.OPERATOR,
                                 ADMIN: Role.ADMIN})


def make(policy: Policy = POLICY, quotas: Quotas | None = None) -> tuple[Core, FakeClock]:
    clock = FakeClock()
    registry = Registry(CONTRACT.enums["MigMode"], migration_time=1.0, clock=clock)
    return Core(CONTRACT, registry, LIMITS, policy=policy, quotas=quotas), clock


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.split(b"\r\n")[:-1]]


def connected(core: Core, uid: int | None) -> Connection:
    conn = core.connect(None if uid is None else Owner(pid=7, uid=uid, gid=uid))
    core.receive_data(conn, b'{"execute": "qmp_capabilities"}')
    core.execute(conn, 32)
    core.data_to_send(conn)
    return conn


def run(core: Core, conn: Connection, command: str, **arguments: Any) -> dict[str, Any]:
    """One request; its reply (the events before it are dropped)."""
    core.receive_data(conn, json.dumps({"execute": command, "arguments": arguments}).encode())
    core.execute(conn, 32)
    replies = [m for m in lines(core.data_to_send(conn)) if "event" not in m]
    assert len(replies) == 1, replies
    return replies[0]


def refused(core: Core, conn: Connection, command: str, **arguments: Any) -> str:
    reply = run(core, conn, command, **arguments)
    assert reply["error"]["class"] == "GenericError", reply
    desc: str = reply["error"]["desc"]
    return desc


def test_a_refusal_changes_nothing_and_nobody_hears_of_it(
        caplog: pytest.LogCaptureFixture) -> None:
    core, _ = make()
    owner, other, watcher = connected(core, CLIENT), connected(core, CLIENT + 100), \
        connected(core, ADMIN)
    run(core, owner, "add-blocker", reason="r", id="x")
    core.data_to_send(watcher)
    changes = core.registry.version
    with caplog.at_level(logging.WARNING, "migblockd"):
        assert refused(core, other, "del-blocker", id="x") == (
            f"Permission denied: del-blocker of blocker 'x', which belongs to uid {CLIENT}, "
            f"needs role admin, but uid {CLIENT + 100} has role client")
    assert core.registry.version == changes and "x" in core.registry
    assert core.data_to_send(watcher) == b""  # no event
    assert caplog.messages == [
        f"client 2 (pid 7, uid {CLIENT + 100}, gid {CLIENT + 100}): refused del-blocker: "
        f"Permission denied: del-blocker of blocker 'x', which belongs to uid {CLIENT}, "
        f"needs role admin, but uid {CLIENT + 100} has role client"]
    assert run(core, owner, "del-blocker", id="x") == {"return": {}}


def test_a_refused_command_does_not_advance_the_migration() -> None:
    core, clock = make()
    admin, observer = connected(core, ADMIN), connected(core, OBSERVER)
    run(core, admin, "migrate-set-capabilities",
        capabilities=[{"capability": "events", "state": True}])
    run(core, admin, "migrate", uri="tcp:h:1")
    core.data_to_send(observer)
    clock.advance(5.0)
    refused(core, observer, "migrate_cancel")
    assert core.registry.status == "setup"  # the due transitions wait for the next tick
    core.tick()
    assert core.registry.status == "completed"


QUERIES = {"query-blockers", "query-migrate", "query-version", "query-qmp-schema"}
CHANGES = {"add-blocker", "del-blocker"}
MIGRATION = {"migrate-set-parameters", "migrate", "migrate_cancel", "migrate-set-capabilities"}


@pytest.mark.parametrize(("uid", "allowed"), [
    (OBSERVER, QUERIES),
    (CLIENT, QUERIES | CHANGES),
    (OPERATOR, QUERIES | CHANGES | MIGRATION),
    (ADMIN, QUERIES | CHANGES | MIGRATION),
], ids=["observer", "client", "operator", "admin"])
def test_what_each_role_may_run(uid: int, allowed: set[str]) -> None:
    core, _ = make()
    conn = connected(core, uid)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("query-blockers", {}), ("query-migrate", {}), ("query-version", {}),
        ("query-qmp-schema", {}), ("add-blocker", {"reason": "r", "id": "mine"}),
        ("del-blocker", {"id": "mine"}), ("migrate-set-parameters", {"mode": "cpr-reboot"}),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "events",
                                                        "state": True}]}),
        ("migrate", {"uri": "tcp:h:1"}), ("migrate_cancel", {})]
    ran = set()
    for command, arguments in requests:
        reply = run(core, conn, command, **arguments)
        if "return" in reply:
            ran.add(command)
        else:
            assert reply["error"]["desc"].startswith(f"Permission denied: {command} needs "), reply
    assert ran == allowed


EXEC_CHANNEL = {"channel-type": "main", "addr": {"transport": "exec", "args": ["sh", "-c", "id"]}}
FILE_CHANNEL = {"channel-type": "main", "addr": {"transport": "file", "filename": "/etc/x",
                                                 "offset": 0}}
TCP_CHANNEL = {"channel-type": "main",
               "addr": {"transport": "socket", "type": "inet", "host": "h", "port": "1"}}
CPR_TCP_CHANNEL = {**TCP_CHANNEL, "channel-type": "cpr"}
RUNS = "(QEMU would run the command as its own user)"
WRITES = "(QEMU would write the file as its own user)"
UNJUDGED = ("migrate with a channel that has no string addr.transport needs role admin "
            "(migblockd cannot tell what QEMU would do with it)")


@pytest.mark.parametrize(("arguments", "what"), [
    ({"uri": "exec:id > /tmp/pwned"}, f"migrate to an exec: URI needs role admin {RUNS}"),
    ({"uri": "exec:"}, f"migrate to an exec: URI needs role admin {RUNS}"),
    ({"uri": "file:/etc/passwd"}, f"migrate to a file: URI needs role admin {WRITES}"),
    ({"channels": [CPR_TCP_CHANNEL, EXEC_CHANNEL]},
     f"migrate with a channel of transport exec needs role admin {RUNS}"),
    ({"channels": [FILE_CHANNEL]},
     f"migrate with a channel of transport file needs role admin {WRITES}"),
], ids=["exec", "exec-empty", "file", "exec-channel", "file-channel"])
def test_an_operator_may_not_make_qemu_run_a_command_or_write_a_file(
        arguments: dict[str, Any], what: str, caplog: pytest.LogCaptureFixture) -> None:
    core, _ = make()
    operator = connected(core, OPERATOR)
    desc = f"Permission denied: {what}, but uid {OPERATOR} has role operator"
    with caplog.at_level(logging.WARNING, "migblockd"):
        assert refused(core, operator, "migrate", **arguments) == desc
    # The line says where to, which the refusal's words do not: the URI an audit of
    # refused exec: migrates looks for, or the channels.
    target = (f"to {arguments['uri']!r}" if "uri" in arguments
              else "with channels " + json.dumps(arguments["channels"], separators=(",", ":")))
    assert caplog.messages == [f"client 1 (pid 7, uid {OPERATOR}, gid {OPERATOR}): "
                               f"refused migrate {target}: {desc}"]
    assert core.registry.status is None  # no migration started
    assert core.stats.migrations_refused["access"] == 1
    # An admin may, and a role below operator hears only that it may not migrate at all.
    assert run(core, connected(core, ADMIN), "migrate", **arguments) == {"return": {}}
    assert refused(core, connected(core, CLIENT), "migrate", **arguments) == (
        f"Permission denied: migrate needs role operator, but uid {CLIENT} has role client")


@pytest.mark.parametrize(("addr", "qemus"), [
    ("exec:id", "Invalid parameter type for 'channels[0].addr', expected: object"),
    ({"args": ["id"]}, "Parameter 'channels[0].addr.transport' is missing"),
    ({"transport": ["exec"]},
     "Invalid parameter type for 'channels[0].addr.transport', expected: string"),
], ids=["addr-not-object", "no-transport", "transport-not-string"])
def test_an_address_the_guard_cannot_judge_needs_an_admin_and_qemu_refuses_it(
        addr: object, qemus: str) -> None:
    # The guard runs before the address is checked (as QEMU's visitor would): an
    # operator hears that only an admin may, and an admin hears QEMU's words.
    core, _ = make()
    arguments = {"channels": [{"channel-type": "main", "addr": addr}]}
    assert refused(core, connected(core, OPERATOR), "migrate", **arguments) == (
        f"Permission denied: {UNJUDGED}, but uid {OPERATOR} has role operator")
    assert refused(core, connected(core, ADMIN), "migrate", **arguments) == qemus
    assert core.registry.status is None


def test_a_refused_migrates_channels_are_logged_as_the_json_sent(
        caplog: pytest.LogCaptureFixture) -> None:
    # Reproduced first: they were a Python repr, [{'channel-type': 'main', 'addr': ...}].
    core, _ = make()
    client = connected(core, CLIENT)
    far = {"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                            "host": "h\u00e9" + "x" * 300, "port": "1"}}
    with caplog.at_level(logging.WARNING, "migblockd"):
        refused(core, client, "migrate", channels=[TCP_CHANNEL])
        refused(core, client, "migrate", channels=[far])
    refusal = f"Permission denied: migrate needs role operator, but uid {CLIENT} has role client"
    sent = ('[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"h\\u00e9'
            + "x" * 300)
    assert caplog.messages == [
        f"client 1 (pid 7, uid {CLIENT}, gid {CLIENT}): refused migrate with channels "
        '[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"h",'
        f'"port":"1"}}}}]: {refusal}',
        f"client 1 (pid 7, uid {CLIENT}, gid {CLIENT}): refused migrate with channels "
        f"{sent[:200]}...: {refusal}"]


@pytest.mark.parametrize("arguments", [
    {"uri": "tcp:h:1"}, {"uri": "unix:/run/dst.sock"}, {"uri": "fd:mig"}, {"uri": "rdma:h:1"},
    {"uri": "vsock:3:1"}, {"uri": "tcp:exec:file:"}, {"uri": "tcp:h:1", "channels": []},
    {"channels": [TCP_CHANNEL]},
    {"channels": [{"channel-type": "main",
                   "addr": {"transport": "rdma", "host": "h", "port": "1"}}]},
], ids=["tcp", "unix", "fd", "rdma", "vsock", "tcp-named-oddly", "no-channels",
        "socket-channel", "rdma-channel"])
def test_an_operator_still_migrates_over_the_network(arguments: dict[str, Any]) -> None:
    core, _ = make()
    assert run(core, connected(core, OPERATOR), "migrate", **arguments) == {"return": {}}
    assert core.registry.status == "setup"


def test_qemus_transports_are_case_sensitive() -> None:
    # "EXEC" is no transport QEMU knows: no permission is needed, and QEMU's
    # visitor refuses it.
    core, _ = make()
    arguments = {"channels": [{"channel-type": "main",
                               "addr": {"transport": "EXEC", "args": ["id"]}}]}
    assert refused(core, connected(core, OPERATOR), "migrate", **arguments) == (
        "Parameter 'channels[0].addr.transport' does not accept value 'EXEC'")


@pytest.mark.parametrize("uri", ["EXEC:id", "Exec:id", " exec:id", "FILE:/x"])
def test_qemus_prefixes_are_case_sensitive(uri: str) -> None:
    # QEMU's strstart() does not see these as exec: or file: (it refuses them, as
    # the simulation does): no permission is needed for them.
    core, _ = make()
    assert refused(core, connected(core, OPERATOR), "migrate", uri=uri) == (
        f"unknown migration protocol: {uri}")


def test_only_an_admin_deletes_another_uids_blocker() -> None:
    core, _ = make()
    owner = connected(core, CLIENT)
    for n in range(3):
        run(core, owner, "add-blocker", reason="r", id=f"b{n}")
    assert refused(core, connected(core, OPERATOR), "del-blocker", id="b0").endswith(
        f"but uid {OPERATOR} has role operator")
    assert run(core, connected(core, ADMIN), "del-blocker", id="b0") == {"return": {}}
    # Another connection of the same uid owns them too.
    assert run(core, connected(core, CLIENT), "del-blocker", id="b1") == {"return": {}}
    # An unknown id is the registry's answer, whoever asks.
    assert refused(core, owner, "del-blocker", id="nope") == "Blocker 'nope' not found"


def test_a_client_the_kernel_did_not_identify_has_the_default_role_and_owns_nothing() -> None:
    core, _ = make(Policy.of(Role.CLIENT))
    anon = connected(core, None)
    run(core, anon, "add-blocker", reason="r", id="x")
    assert refused(core, connected(core, None), "del-blocker", id="x") == (
        "Permission denied: del-blocker of blocker 'x', which belongs to no known uid, needs "
        "role admin, but a client whose uid the kernel did not report has role client")
    assert refused(core, anon, "migrate", uri="tcp:h:1").startswith(
        "Permission denied: migrate needs role operator")
    assert core.registry.count_owned(None) == 1


def test_unknown_commands_need_admin() -> None:
    core, _ = make()
    guard = Guard(["human-monitor-command"], core.registry, POLICY, Quotas())
    conn = connected(core, OPERATOR)
    with pytest.raises(Exception, match="human-monitor-command needs role admin"):
        guard.check(conn, "human-monitor-command", {})
    guard.check(connected(core, ADMIN), "human-monitor-command", {})


def test_quotas_count_per_uid_and_in_total_and_admins_skip_only_the_per_uid_one() -> None:
    core, _ = make(quotas=Quotas(max_blockers=4, max_blockers_per_uid=2, max_reason_length=3))
    a, a2, admin = connected(core, CLIENT), connected(core, CLIENT), connected(core, ADMIN)
    assert refused(core, a, "add-blocker", reason="long") == (
        "Parameter 'reason' is too long: 4 characters, max-reason-length is 3")
    assert refused(core, admin, "add-blocker", reason="long").startswith(
        "Parameter 'reason' is too long")
    run(core, a, "add-blocker", reason="r", id="a0")
    run(core, a2, "add-blocker", reason="r", id="a1", scope="connection")
    assert refused(core, a, "add-blocker", reason="r") == (
        f"Too many migration blockers for uid {CLIENT}: it owns 2, max-blockers-per-uid is 2")
    core.disconnect(a2)  # its connection-scoped blocker goes, and with it the count
    assert core.registry.count_owned(CLIENT) == 1
    run(core, a, "add-blocker", reason="r", id="a2")
    run(core, admin, "add-blocker", reason="r", id="r0")
    run(core, admin, "add-blocker", reason="r", id="r1")
    assert refused(core, admin, "add-blocker", reason="r") == (
        "Too many migration blockers: 4 registered, max-blockers is 4")
    assert [b.id for b in core.registry.blockers()] == ["a0", "a2", "r0", "r1"]


def test_a_reload_applies_to_the_next_request_of_open_connections() -> None:
    core, _ = make()
    conn = connected(core, CLIENT)
    run(core, conn, "add-blocker", reason="r", id="x")
    assert conn.role is Role.CLIENT
    assert core.guard.configure(Policy.of(Role.OBSERVER), Quotas(max_reason_length=1),
                               core.connections)[1] == [
        f"uid {CLIENT} is observer (was client)"]  # resolved again, for the reload's line
    assert refused(core, conn, "del-blocker", id="x").endswith("has role observer")
    core.guard.configure(Policy.of(Role.OPERATOR), Quotas(max_reason_length=1),
                        core.connections)
    assert refused(core, conn, "add-blocker", reason="rr").startswith(
        "Parameter 'reason' is too long")
    assert run(core, conn, "migrate-set-parameters", mode="cpr-reboot") == {"return": {}}


def test_the_registry_counts_each_uids_blockers() -> None:
    registry = Registry(CONTRACT.enums["MigMode"])
    conn = object()
    registry.add("r", id="a", owner=Owner(1, 10, 10))
    registry.add("r", id="b", owner=Owner(2, 10, 11), scope="connection", connection=conn)
    registry.add("r", id="c", owner=Owner(3, 11, 11))
    registry.add("r", id="d")
    assert [registry.count_owned(u) for u in (10, 11, 12, None)] == [2, 1, 0, 1]
    registry.release(conn)
    registry.delete("c")
    registry.delete("d")
    assert [registry.count_owned(u) for u in (10, 11, 12, None)] == [1, 0, 0, 0]


def test_a_policy_that_would_demote_root_or_the_daemons_user_is_warned_of(
        caplog: pytest.LogCaptureFixture) -> None:
    # Such entries were ignored without a word: the policy said less than it did.
    registry = Registry(CONTRACT.enums["MigMode"])
    policy = Policy.of(users={"root": Role.OBSERVER, ADMIN: Role.CLIENT, 0: Role.ADMIN,
                              CLIENT: Role.OBSERVER})
    with caplog.at_level(logging.WARNING, "migblockd"):
        guard = Guard(CONTRACT.commands, registry, policy, Quotas(), daemon_uid=ADMIN)
    expected = [
        f"access: the policy gives user '{ADMIN}' role client, but root and the daemon's own "
        "user are always admin",
        "access: the policy gives user 'root' role observer, but root and the daemon's own "
        "user are always admin"]
    assert caplog.messages == expected
    caplog.clear()
    with caplog.at_level(logging.WARNING, "migblockd"):
        guard.configure(policy, Quotas())  # and at each reload
    assert caplog.messages == expected
    assert guard.resolver.role(0) is Role.ADMIN and guard.resolver.role(ADMIN) is Role.ADMIN
