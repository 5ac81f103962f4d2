"""The gate's handlers in the core, with no event loop and no QEMU: calls out, answers in.

The end-to-end behaviour against a real QEMU is in test_gate.py; here the order of
things is pinned down exactly, which a real QEMU's timing would blur.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from migblockd import drain as drain_module
from migblockd.access import Policy, Quotas, Role
from migblockd.config import Config
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.gate import Call, GateHandlers
from migblockd.notify import format_status
from migblockd.qemu_facts import (
    QemuError,
    QemuFacts,
    QemuGivenUp,
    QemuRestarted,
    QemuUnavailable,
)
from migblockd.registry import FakeClock, Owner, Registry
from migblockd.resolver import who

CONTRACT = Contract.load()
PATH = Path("/run/qemu/vm1.qmp")
#: query-status of a QEMU started with -S, as QEMU 7.2 answers it.
PRELAUNCH = {"status": "prelaunch", "singlestep": False, "running": False}


def make(connected: bool = True, role: Role = Role.ADMIN,
         quotas: Quotas | None = None, durable: bool = False) -> tuple[Core, QemuFacts]:
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    facts = QemuFacts(PATH, connected=connected, learnt=True,
                      version="7.2.22",
                      commands={"migrate": frozenset({"uri", "blk", "inc", "detach", "resume"}),
                                "migrate-set-parameters": frozenset({"max-bandwidth"})})
    handlers = GateHandlers(CONTRACT, registry, facts, passthrough=("query-status",))
    return Core(CONTRACT, registry, Config().limits, handlers=handlers, durable=durable,
                policy=Policy.of(role), quotas=quotas), facts


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.split(b"\r\n")[:-1]]


def feed(core: Core, conn: Connection, data: bytes = b"") -> list[dict[str, Any]]:
    core.receive_data(conn, data)
    while core.has_pending(conn) and not core.blocked(conn) and core.execute(conn, 32):
        pass
    return lines(core.data_to_send(conn))


def connected(core: Core, owner: Owner | None = None) -> Connection:
    conn = core.connect(Owner(1, 0, 0) if owner is None else owner)
    core.data_to_send(conn)
    assert feed(core, conn, b'{"execute": "qmp_capabilities"}') == [{"return": {}}]
    return conn


def test_migrate_asks_qemu_then_forwards_and_relays_events_before_the_reply() -> None:
    core, _ = make()
    a, b = connected(core), connected(core)
    assert feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "exec:cat", '
                         b'"detach": true}, "id": "m"}{"execute": "query-version", "id": "v"}'
                ) == []
    assert core.blocked(a)
    (conn, call), = core.take_calls()
    assert conn is a and call == Call("query-migrate", {})
    core.resume(a, {})
    (_, call), = core.take_calls()
    assert call == Call("migrate", {"uri": "exec:cat", "detach": True})  # as the caller gave it
    # QEMU sends MIGRATION setup before its reply: relayed as is, then the reply.
    stamp = {"seconds": 1, "microseconds": 2}
    core.relay("MIGRATION", {"status": "setup"}, stamp)
    core.resume(a, {})
    out = feed(core, a)
    assert out == [{"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": stamp},
                   {"return": {}, "id": "m"},
                   {"return": core.table["query-version"].handler(a, {}),  # type: ignore[operator]
                    "id": "v"}]
    assert lines(core.data_to_send(b)) == out[:1]


def test_a_blocker_refuses_migrate_before_qemu_is_asked_to_migrate() -> None:
    core, _ = make()
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "dump", "id": "d"}}')
    (_, call), = core.take_calls()  # is QEMU migrating?  (the busy check)
    assert call.name == "query-migrate"
    core.resume(a, {})
    feed(core, a)
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "exec:cat"}, "id": 1}')
    (_, call), = core.take_calls()
    assert call.name == "query-migrate"
    core.resume(a, {"blocked-reasons": ["QEMU's own"]})
    (_, call), = core.take_calls()  # QEMU's run state refuses before any blocker
    assert call == Call("query-status", {})
    core.resume(a, PRELAUNCH)
    assert core.take_calls() == []  # never a migrate
    assert feed(core, a) == [{"id": 1, "error": {"class": "GenericError", "desc": "dump"}}]


def test_an_argument_this_qemu_does_not_take_is_refused_before_any_question() -> None:
    # QEMU 9.1 and later have no blk (and no inc): their visitor refuses it
    # before migrate_prepare() runs; migblockd's schema still takes it.
    core, facts = make()
    facts.commands = {"migrate": frozenset({"uri", "detach", "resume", "channels"})}
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "dump"}}')
    assert [call.name for _, call in core.take_calls()] == ["query-migrate"]
    core.resume(a, {})
    feed(core, a)
    assert feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "exec:cat", '
                         b'"blk": false}, "id": 1}') == [
        {"id": 1, "error": {"class": "GenericError", "desc": "Parameter 'blk' is unexpected"}}]
    assert core.take_calls() == []
    facts.connected = False  # who knows what the next QEMU takes: not judged
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "exec:cat", "blk": false}}')
    assert [call.name for _, call in core.take_calls()] == ["query-migrate"]


def test_a_resume_goes_to_qemu_which_judges_the_paused_migration() -> None:
    # QEMU's migrate_prepare() checks a resume against the paused postcopy
    # migration only: no "in progress" (one is, paused), no blocker.
    core, _ = make()
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "late"}}')
    assert [call.name for _, call in core.take_calls()] == ["query-migrate"]
    core.resume(a, {})  # QEMU does not migrate: added
    assert len(core.registry.blockers()) == 1
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1", "resume": true}, '
                  b'"id": "r"}')
    (_, call), = core.take_calls()
    assert call == Call("migrate", {"uri": "tcp:h:1", "resume": True})
    core.resume(a, error=QemuError("GenericError",
                                   "Cannot resume if there is no paused migration"))
    assert feed(core, a)[-1] == {"id": "r", "error": {
        "class": "GenericError", "desc": "Cannot resume if there is no paused migration"}}


def test_a_resume_qemu_refuses_leaves_the_paused_migration_awaited() -> None:
    # Its end is still counted (migrations_ended), and a resume QEMU takes is
    # not one more migration started.
    core, facts = make()
    a = connected(core)
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}}')
    core.resume(a, {})  # not migrating
    core.resume(a, {})  # migrate taken
    facts.saw_status("postcopy-paused")
    resume = b'{"execute": "migrate", "arguments": {"uri": "tcp:h:2", "resume": true}}'
    feed(core, a, resume)
    core.resume(a, error=QemuError("GenericError", "refused"))
    feed(core, a, resume)
    core.resume(a, {})
    facts.saw_status("completed")
    assert facts.ended["completed"] == 1
    assert core.stats.commands["migrate"].ok == 2 and core.stats.migrations_started == 1


def test_qemus_errors_come_back_verbatim_and_absence_names_the_monitor() -> None:
    core, _ = make()
    a = connected(core)
    feed(core, a, b'{"execute": "query-status", "id": 1}')  # a pass-through command
    (_, call), = core.take_calls()
    assert call == Call("query-status", {})
    core.resume(a, error=QemuError("DeviceNotFound", "Device 'x' not found"))
    assert feed(core, a) == [
        {"id": 1, "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}]
    feed(core, a, b'{"execute": "query-migrate", "id": 2}')
    core.take_calls()
    why = f"Not connected to QEMU's monitor at '{PATH}': Connection refused"
    core.resume(a, error=QemuUnavailable(why))
    assert feed(core, a) == [{"id": 2, "error": {"class": "GenericError", "desc": why}}]


def test_blocker_commands_work_without_qemu_which_then_lists_no_blockers() -> None:
    core, _ = make(connected=False)
    a = connected(core)
    out = feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x"}}'
                        b'{"execute": "query-blockers", "id": "q"}'
                        b'{"execute": "del-blocker", "arguments": {"id": "qemu:1"}, "id": "d"}')
    assert core.take_calls() == []  # nothing to ask a QEMU that is not there
    assert [b["id"] for b in out[-2]["return"]] == ["x"]
    # As listed: without QEMU there is no qemu:1 (with it, tests/test_gate.py).
    assert out[-1]["error"]["desc"] == "Blocker 'qemu:1' not found"


def test_the_mode_stays_migblockds_when_qemu_does_not_know_it() -> None:
    core, _ = make()
    a = connected(core)
    feed(core, a, b'{"execute": "migrate-set-parameters", "arguments": '
                  b'{"mode": "cpr-reboot", "max-bandwidth": 1000}, "id": 1}')
    (_, call), = core.take_calls()
    assert call == Call("migrate-set-parameters", {"max-bandwidth": 1000})  # no mode: 7.2
    core.resume(a, {})
    assert feed(core, a) == [{"return": {}, "id": 1}]
    assert core.registry.mode == "cpr-reboot"
    feed(core, a, b'{"execute": "query-migrate-parameters", "id": 2}')
    core.take_calls()
    core.resume(a, {"max-bandwidth": 1000})
    assert feed(core, a) == [{"return": {"max-bandwidth": 1000, "mode": "cpr-reboot"}, "id": 2}]


def test_while_a_forwarded_migrate_waits_no_blocker_slips_in() -> None:
    core, _ = make()
    a, b = connected(core), connected(core)
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "exec:cat"}}')
    core.take_calls()
    core.resume(a, {})  # not migrating: migrate goes to QEMU
    (_, call), = core.take_calls()
    assert call.name == "migrate"
    out = feed(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "late"}, "id": 9}')
    assert out == [{"id": 9, "error": {"class": "GenericError", "desc":
                    "disallowing migration blocker (migration/snapshot in progress) for: late"}}]
    core.resume(a, {})
    assert feed(core, a) == [{"return": {}}]


def test_adds_that_waited_for_qemu_together_each_count_against_the_quotas() -> None:
    # Each add asks QEMU whether it migrates first: the guard judged all of them
    # before any was answered, when nobody owned anything yet.
    core, _ = make(role=Role.CLIENT, quotas=Quotas(max_blockers=3, max_blockers_per_uid=2))
    clients = [connected(core, Owner(3, 1000, 1000)) for _ in range(3)]
    # Admins: exempt from the per-uid quota, not from max-blockers.
    admins = [connected(core), connected(core)]
    for n, conn in enumerate([*clients, *admins]):
        feed(core, conn, b'{"execute": "add-blocker", "arguments": {"reason": "r%d"}, '
                         b'"id": %d}' % (n, n))
    calls = core.take_calls()
    assert [call for _, call in calls] == [Call("query-migrate", {})] * 5
    for conn, _ in calls:
        core.resume(conn, {})
    replies = [m for conn in [*clients, *admins] for m in lines(core.data_to_send(conn))
               if "id" in m]
    assert [("return" in m, m["id"]) for m in replies] == [
        (True, 0), (True, 1), (False, 2), (True, 3), (False, 4)]
    assert replies[2]["error"]["desc"] == (f"Too many migration blockers for {who(1000)}: it "
                                           "owns 2, max-blockers-per-uid is 2")
    assert replies[4]["error"]["desc"] == ("Too many migration blockers: 3 registered, "
                                           "max-blockers is 3")
    assert [b.reason for b in core.registry.blockers()] == ["r0", "r1", "r3"]


def test_adds_that_got_no_answer_from_qemu_count_against_the_quotas_too() -> None:
    # While QEMU is away or silent, add-blocker adds anyway: the quota must hold then too.
    core, _ = make(role=Role.CLIENT, quotas=Quotas(max_blockers_per_uid=2))
    clients = [connected(core, Owner(3, 1000, 1000)) for _ in range(4)]
    for n, conn in enumerate(clients):
        feed(core, conn, b'{"execute": "add-blocker", "arguments": {"reason": "r%d"}}' % n)
    for conn, _ in core.take_calls():
        core.resume(conn, error=QemuUnavailable("QEMU's monitor did not answer"))
    assert core.registry.count_owned(1000) == 2
    assert core.stats.blockers_refused["quota"] == 2


#: What turns.py resumes a command with when the stop gives up on its call.
GIVEN_UP = ("migblockd stopped before QEMU answered; the command may or may not have "
            "taken effect")


def test_commands_given_up_at_the_stop_fail_in_its_words_and_change_nothing() -> None:
    """Reported: an add-blocker given up on at the stop added its blocker, as while
    QEMU is away.  QEMU did not answer; whatever a silent or absent QEMU would have made
    of each command (an addition, a busy refusal, a list without QEMU's blockers), each
    fails with the stop's words."""
    core, facts = make()
    a, b = connected(core), connected(core)
    requests = [
        b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "w"}, "id": 1}',
        b'{"execute": "query-blockers", "id": 1}',
        b'{"execute": "del-blocker", "arguments": {"id": "qemu:1"}, "id": 1}',
        b'{"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-reboot", '
        b'"max-bandwidth": 1}, "id": 1}',
    ]
    for learnt in (True, False):  # False: QEMU may be migrating
        facts.learnt = learnt
        for request in requests:
            assert feed(core, a, request) == []
            (_, call), = core.take_calls()
            core.resume(a, error=QemuGivenUp(GIVEN_UP))
            assert feed(core, a) == [
                {"id": 1, "error": {"class": "GenericError", "desc": GIVEN_UP}}], request
    # Its query-status given up on, an add that QEMU's query-migrate found busy
    # (or incoming) is not told busy either.
    feed(core, a, requests[0])
    core.take_calls()
    core.resume(a, {"status": "active"})
    (_, call), = core.take_calls()
    assert call == Call("query-status", {})
    core.resume(a, error=QemuGivenUp(GIVEN_UP))
    assert feed(core, a) == [{"id": 1, "error": {"class": "GenericError", "desc": GIVEN_UP}}]
    assert len(core.registry) == 0 and core.registry.mode == "normal"
    assert lines(core.data_to_send(b)) == []  # no BLOCKER_ADDED
    assert core.stats.blockers_refused["qemu-unavailable"] == 3


def test_the_status_line_shows_the_link_to_qemu() -> None:
    core, facts = make()
    assert format_status(*core.status()) == (
        "0 blockers, 0 clients, migration: none, QEMU 7.2.22 connected")
    facts.connected, facts.status = False, None
    assert format_status(*core.status()).endswith(", QEMU not connected")
    plain = Core(CONTRACT, Registry(CONTRACT.enums["MigMode"], clock=FakeClock()),
                 Config().limits)
    assert format_status(*plain.status()) == "0 blockers, 0 clients, migration: none"


def test_forwarded_commands_are_the_admins_whatever_their_name() -> None:
    # An observer may run the schema's query-* commands, but not QEMU's: a
    # forwarded query-status could tell it anything QEMU knows.
    core, _ = make(role=Role.OBSERVER)
    a = core.connect(Owner(2, 4321, 4321))  # not root, nor the daemon's user: an observer
    core.data_to_send(a)
    feed(core, a, b'{"execute": "qmp_capabilities"}')
    out = feed(core, a, b'{"execute": "query-status", "id": 1}'
                        b'{"execute": "query-version", "id": 2}')
    assert core.take_calls() == []  # QEMU was never asked
    assert out[0]["error"]["desc"].startswith(
        "Permission denied: query-status needs role admin, but ")
    assert "return" in out[1]


def test_an_answer_migblockd_cannot_read_never_starts_a_migration() -> None:
    """Fail closed: unless QEMU's query-migrate says what runs, migrate is refused."""
    core, _ = make()
    a = connected(core)
    answers: tuple[object, ...] = (None, [], "active")
    for answer in answers:
        assert feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, '
                             b'"id": 1}') == []
        (_, call), = core.take_calls()
        assert call == Call("query-migrate", {})
        core.resume(a, answer)
        reply, = feed(core, a)
        assert reply["error"]["desc"] == ("QEMU's answer to query-migrate was not "
                                          f"understood: {json.dumps(answer)}")
        assert core.take_calls() == []  # migrate never reached QEMU


def test_a_status_that_is_not_text_is_no_internal_error() -> None:
    core, facts = make()
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x"}}')
    (_, call), = core.take_calls()
    assert call == Call("query-migrate", {})
    core.resume(a, {"status": ["active"]})
    event, reply = feed(core, a)
    assert event["event"] == "BLOCKER_ADDED" and reply["return"]["id"] == "x"
    assert facts.status is None


def test_qemu_blocker_ids_are_only_those_query_blockers_writes() -> None:
    core, _ = make()
    a = connected(core)
    for id in ("qemu:01", "qemu:1"):
        feed(core, a, b'{"execute": "del-blocker", "arguments": {"id": "%s"}, "id": 1}'
             % id.encode())
        (_, call), = core.take_calls()
        assert call == Call("query-migrate", {})
        core.resume(a, {"blocked-reasons": ["qemu's own"]})
        reply, = feed(core, a)
        if id == "qemu:01":
            assert reply["error"]["desc"] == f"Blocker '{id}' not found", reply
        else:
            assert "is QEMU's own" in reply["error"]["desc"]


def test_an_answer_queued_before_migrate_does_not_end_it() -> None:
    """query-migrate answers arriving while migrate is in flight may be older than it:
    the previous migration's "cancelled" is not this one's end."""
    core, facts = make()
    a, b = connected(core), connected(core)
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}}')
    core.take_calls()
    core.resume(a, {"status": "cancelled"})  # a's own check: nothing runs
    (_, call), = core.take_calls()
    assert call.name == "migrate" and facts.busy and facts.awaiting
    feed(core, b, b'{"execute": "query-migrate"}')
    (_, call), = core.take_calls()
    core.resume(b, {"status": "cancelled"})  # b's answer, queued before the migrate
    assert facts.ended["cancelled"] == 0 and facts.awaiting
    core.resume(a, {})
    feed(core, b, b'{"execute": "query-migrate"}')
    core.take_calls()
    core.resume(b, {"status": "completed"})
    assert facts.ended == {"completed": 1, "failed": 0, "cancelled": 0}
    assert not facts.awaiting


def test_a_migrate_qemu_refused_too_late_to_say_is_awaited_until_qemu_shows_none() -> None:
    """A migrate with no answer in time (QEMU still has it) may run: awaited, so that a
    silent QEMU takes no blocker.  A status of none, once QEMU has run it, says it
    never started."""
    core, facts = make()
    a = connected(core)
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}}')
    core.take_calls()
    core.resume(a, {})
    (_, call), = core.take_calls()
    assert call.name == "migrate"
    facts.unanswered = True  # the bridge's, on QEMU's timeout
    core.resume(a, error=QemuUnavailable("did not answer 'migrate' within 10 s"))
    assert facts.awaiting and facts.may_migrate()
    facts.unanswered = False  # QEMU answered a later command: it has run the migrate
    assert facts.may_migrate()
    feed(core, a, b'{"execute": "query-migrate"}')
    core.take_calls()
    core.resume(a, {})
    assert not facts.awaiting and not facts.may_migrate()
    assert facts.ended == {"completed": 0, "failed": 0, "cancelled": 0}


def dump_on_disk() -> tuple[Core, Connection, Connection]:
    """A durable gating core, two clients, and a's blocker 'd' ("dump") committed."""
    core, _ = make(durable=True)
    a, b = connected(core), connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "dump", "id": "d"}}')
    core.take_calls()
    core.resume(a, {})
    group = core.take_group(wait=False)
    assert group is not None
    core.committed(group)
    feed(core, a)
    return core, a, b


def test_migrate_decides_only_by_blockers_on_disk() -> None:
    """A del-blocker run while migrate waited for QEMU is not on disk yet: migrate
    goes on only once it is, and a failed commit leaves the blocker refusing it."""
    core, a, b = dump_on_disk()
    feed(core, b)
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": "m"}')
    (_, call), = core.take_calls()
    assert call == Call("query-migrate", {})
    assert feed(core, b, b'{"execute": "del-blocker", "arguments": {"id": "d"}, '
                         b'"id": "del"}') == []  # held until committed
    core.resume(a, {})  # nothing runs in QEMU; the deletion is not on disk yet
    assert core.take_calls() == [] and core.blocked(a)
    # What QEMU sends meanwhile reaches a as QEMU sent it: before migrate's reply.
    stamp = {"seconds": 1, "microseconds": 2}
    core.relay("MIGRATION", {"status": "setup"}, stamp)
    group = core.take_group(wait=False)
    assert group is not None
    woken = core.commit_failed(group, "cannot commit: disk I/O error")
    assert [m["id"] for m in feed(core, b) if "id" in m] == ["del"]
    assert woken == [a] and not core.blocked(a)
    # The blocker is back, and refuses (after QEMU's run state, which comes first):
    # QEMU was never asked to migrate.
    assert feed(core, a) == [
        {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": stamp}]
    (_, call), = core.take_calls()
    assert call == Call("query-status", {})
    core.resume(a, PRELAUNCH)
    assert feed(core, a) == [{"id": "m", "error": {"class": "GenericError", "desc": "dump"}}]
    assert core.take_calls() == []
    # Committed, the deletion counts: the next migrate goes to QEMU.
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": "n"}')
    core.take_calls()
    core.resume(a, {})
    (_, call), = core.take_calls()
    assert call == Call("query-status", {})  # (the blocker: QEMU's run state first)
    feed(core, b, b'{"execute": "del-blocker", "arguments": {"id": "d"}}')
    core.resume(a, PRELAUNCH)
    assert core.take_calls() == []
    group = core.take_group(wait=False)
    assert group is not None
    assert core.committed(group) == [a]
    feed(core, a)
    (_, call), = core.take_calls()
    assert call == Call("migrate", {"uri": "tcp:h:1"})
    core.resume(a, {})
    assert feed(core, a) == [{"return": {}, "id": "n"}]


def test_qemus_run_state_comes_first_for_a_blocker_back_from_a_failed_deletion() -> None:
    """The blocker is gone when QEMU answers query-migrate, so its run state is not
    asked; the deletion's commit fails and the blocker is back.  Reported: migrate
    quoted it where QEMU, paused after a migration, refuses for that first."""
    core, a, b = dump_on_disk()
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": "m"}')
    core.take_calls()
    feed(core, b, b'{"execute": "del-blocker", "arguments": {"id": "d"}}')
    core.resume(a, {"status": "completed"})
    assert core.take_calls() == [] and core.blocked(a)  # no blocker: nothing to ask yet
    group = core.take_group(wait=False)
    assert group is not None
    assert core.commit_failed(group, "cannot commit: disk I/O error") == [a]
    assert feed(core, a) == []
    (_, call), = core.take_calls()
    assert call == Call("query-status", {})
    core.resume(a, {"status": "postmigrate", "singlestep": False, "running": False})
    assert feed(core, a) == [{"id": "m", "error": {"class": "GenericError", "desc": (
        "Can't migrate the vm that was paused due to previous migration")}}]
    assert core.take_calls() == []


def test_qemus_run_state_refuses_migrate_first_and_an_incoming_migration_is_not_busy() -> None:
    """QEMU's migrate_prepare() judges its run state before any blocker; on the
    destination, query-migrate's status is the incoming migration's, during which
    QEMU takes new blockers and refuses migrate for waiting for it."""
    core, _ = make()
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "dump", "id": "d"}}')
    core.take_calls()
    core.resume(a, {})
    feed(core, a)
    for runstate, desc in (("postmigrate", "Can't migrate the vm that was paused due to "
                            "previous migration"),
                           ("inmigrate", "Guest is waiting for an incoming migration")):
        feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": 1}')
        core.take_calls()
        core.resume(a, {"status": "completed"})
        (_, call), = core.take_calls()
        assert call == Call("query-status", {})
        core.resume(a, {"status": runstate, "singlestep": False, "running": False})
        assert feed(core, a) == [{"id": 1, "error": {"class": "GenericError", "desc": desc}}]
    incoming = {"status": "active", "socket-address": [
        {"type": "inet", "host": "127.0.0.1", "port": "4444", "ipv4": True}]}
    inmigrate = {"status": "inmigrate", "singlestep": False, "running": False}
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "late", "id": "l"}, '
                  b'"id": 2}')
    core.take_calls()
    core.resume(a, incoming)
    (_, call), = core.take_calls()
    assert call == Call("query-status", {})
    core.resume(a, inmigrate)
    assert [m.get("id") for m in feed(core, a)] == [None, 2]  # BLOCKER_ADDED, the reply
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}, "id": 3}')
    core.take_calls()
    core.resume(a, incoming)
    core.take_calls()
    core.resume(a, inmigrate)
    assert feed(core, a) == [{"id": 3, "error": {
        "class": "GenericError", "desc": "Guest is waiting for an incoming migration"}}]
    # A migration going out is still busy, whatever the run state; and so is one
    # whose run state QEMU does not tell.
    statuses: tuple[dict[str, object], ...] = (PRELAUNCH, {"status": None})
    for status in statuses:
        feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r"}, "id": 4}')
        core.take_calls()
        core.resume(a, {"status": "active"})
        core.take_calls()
        core.resume(a, status)
        assert feed(core, a)[0]["error"]["desc"].startswith("disallowing migration blocker")



def test_shutdown_names_what_a_client_it_gives_up_on_was_waiting_for(
        monkeypatch: Any) -> None:
    """At the drain's end a client whose reply waits for QEMU is said to wait for
    QEMU, not to be slow at taking its replies; one that does not read is."""
    core, _ = make()
    waiting, reader = connected(core), connected(core)
    assert feed(core, waiting, b'{"execute": "query-migrate", "id": "q"}') == []
    assert core.blocked(waiting)  # its call to QEMU is never answered
    feed(core, reader, b'{"execute": "query-version"}')  # and never read

    class Stuck:
        lingering = False

        def __init__(self, conn: Connection) -> None:
            self.conn: Connection | None = conn
            self.why = ""

        def progress(self) -> tuple[int, int, bool]:
            return (0, 0, False)

        def drop(self, why: str) -> None:
            self.why = why
            assert self.conn is not None
            del protocols[self.conn]

    stuck = [Stuck(waiting), Stuck(reader)]
    protocols = {p.conn: p for p in stuck if p.conn is not None}
    monkeypatch.setattr(drain_module, "SHUTDOWN_LIMIT", 0.2)
    monkeypatch.setattr(drain_module, "SHUTDOWN_STALL", 60.0)  # only the end drops

    async def run() -> None:
        await drain_module.drain(asyncio.get_running_loop(), core, protocols,
                                 asyncio.Event())

    asyncio.run(asyncio.wait_for(run(), 10))
    assert [p.why for p in stuck] == [
        "still waiting for QEMU's answer after 0.2s of shutdown",
        "still taking its last replies after 0.2s of shutdown"]


def test_the_calls_of_one_command_share_a_pin_and_the_next_command_has_its_own() -> None:
    # The sender (the bridge) sends every call of one pin to one QEMU connection.
    core, _ = make()
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "dump", "id": "d"}}')
    (_, busy), = core.take_calls()
    core.resume(a, {})
    feed(core, a)
    feed(core, a, b'{"execute": "migrate", "arguments": {"uri": "exec:cat"}, "id": 1}')
    (_, first), = core.take_calls()
    core.resume(a, {})
    (_, second), = core.take_calls()  # the blocker: QEMU's run state first
    assert first.pin is not None and second.pin is first.pin
    assert busy.pin is not None and busy.pin is not first.pin


def test_a_command_whose_qemu_was_restarted_between_its_calls_says_so() -> None:
    # add-blocker's second call (QEMU migrates: an incoming migration?) found another
    # QEMU connection: not refused as busy, but with the reason, to try again.
    core, _ = make()
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "dump"}, "id": 1}')
    core.take_calls()
    core.resume(a, {"status": "active"})
    (_, call), = core.take_calls()
    assert call.name == "query-status"
    restarted = f"QEMU at '{PATH}' was restarted while migblockd checked the command: " \
                "nothing was sent to the new QEMU; try again"
    core.resume(a, error=QemuRestarted(restarted))
    assert feed(core, a) == [{"id": 1, "error": {"class": "GenericError", "desc": restarted}}]
    assert len(core.registry) == 0


def test_an_answer_handled_after_its_connection_was_lost_teaches_nothing() -> None:
    # Found by review: QEMU's answer to add-blocker's check, handled in the turn
    # after the link's loss was (which forgets what QEMU said), set "learnt" again:
    # the next QEMU on the path, silent, took blockers on the old one's word.
    core, facts = make()
    a = connected(core)
    feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x"}}')
    assert [call.name for _, call in core.take_calls()] == ["query-migrate"]
    facts.connected, facts.learnt = False, False  # lost, as the bridge says
    facts.greeting_awaited = lambda: True  # and something accepted the next connection
    core.resume(a, {})  # the old QEMU's answer: not migrating
    assert feed(core, a)[-1]["return"]["id"] == "x"  # asked before: as if added before
    assert not facts.learnt
    reply = feed(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r"}}')
    assert reply[-1]["error"]["desc"].startswith("disallowing migration blocker")
    assert core.take_calls() == []


def test_query_blockers_of_a_mode_no_qemu_lists_asks_no_qemu_not_set_up() -> None:
    # Found by review of 295d206: while a QEMU that accepted the connection has not
    # been set up (not greeted yet: a stopped or busy QEMU), query-blockers of a mode
    # that neither migblockd's current mode nor normal (QEMU 7.2's only one) is, and
    # so can list none of QEMU's blockers whatever QEMU it is, waited for QEMU's
    # query-migrate, and failed with it ("QEMU's own blockers cannot be listed"),
    # where before it answered at once with migblockd's.
    core, facts = make(connected=False)
    facts.greeting_awaited = lambda: True
    a = connected(core)
    reply = feed(core, a, b'{"execute": "query-blockers", "arguments": {"mode": "cpr-exec"}}')
    assert reply == [{"return": []}]
    assert core.take_calls() == []
    # Of normal (the current mode here, and QEMU 7.2's), QEMU's are asked for.
    assert feed(core, a, b'{"execute": "query-blockers", "arguments": {"mode": "normal"}}') == []
    assert [call.name for _, call in core.take_calls()] == ["query-migrate"]
