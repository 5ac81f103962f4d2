"""Durability in the core, without a disk: held output, group commit, failures undone."""

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
from migblockd.ledger import Group, Ledger
from migblockd.logs.throttle import BURST
from migblockd.registry import ID_CHUNK, Blocker, FakeClock, Owner, Registry
from migblockd.resolver import who

CONTRACT = Contract.load()
LIMITS = Config().limits
#: What the first of failed commits in a row adds to its line.
UNTIL = ("; every change fails until a commit succeeds: free space on the state directory's "
         "file system, or look for its errors in the kernel's log")
ADD_X = b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x"}, "id": "add"}'


def make(quotas: Quotas | None = None) -> Core:
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    # Everyone is admin here: these tests are about durability, not access.
    return Core(CONTRACT, registry, LIMITS, durable=True, policy=Policy.of(Role.ADMIN),
                quotas=quotas)


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.split(b"\r\n")[:-1]]


def run(core: Core, conn: Connection, data: bytes = b"") -> list[dict[str, Any]]:
    core.receive_data(conn, data)
    while core.has_pending(conn) and core.execute(conn, 32):
        pass
    return lines(core.data_to_send(conn))


def taken(core: Core) -> Group:
    """The group due for a commit (there must be one)."""
    group = core.take_group()
    assert group is not None
    return group


def connected(core: Core, uid: int) -> Connection:
    conn = core.connect(Owner(pid=uid, uid=uid, gid=uid))
    core.data_to_send(conn)
    assert run(core, conn, b'{"execute": "qmp_capabilities"}') == [{"return": {}}]
    return conn


def test_a_change_is_heard_of_by_nobody_until_it_is_committed() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    assert run(core, a, ADD_X) == []
    assert run(core, b) == []  # not even the event
    group = taken(core)
    assert [(c.kind, c.blocker.id if c.blocker else None) for c in group.changes] == [
        ("add", "x")]
    assert core.take_group() is None  # one commit in flight at a time
    assert core.committed(group) == []
    to_a = lines(core.data_to_send(a))
    assert [m.get("event") for m in to_a] == ["BLOCKER_ADDED", None]
    assert to_a[1]["id"] == "add"
    assert [m["event"] for m in lines(core.data_to_send(b))] == ["BLOCKER_ADDED"]


def test_changes_of_one_turn_go_in_one_group_and_later_ones_in_the_next() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "a1"}}'
                 b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "a2"}}')
    run(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "b1"}}')
    first = taken(core)
    assert [c.blocker.id for c in first.changes if c.blocker] == ["a1", "a2", "b1"]
    run(core, b, b'{"execute": "del-blocker", "arguments": {"id": "a1"}, "id": "late"}')
    assert core.take_group() is None  # the first is still being committed
    core.committed(first)
    replies_b = [m for m in lines(core.data_to_send(b)) if "event" not in m]
    assert len(replies_b) == 1  # b1's reply; "late" waits for the next commit
    assert core.take_group() is None  # a, just answered, may be about to send more
    run(core, a, b'{"execute": "query-version"}')
    second = taken(core)
    assert [c.kind for c in second.changes] == ["delete"]
    core.committed(second)
    assert [m for m in lines(core.data_to_send(b)) if "event" not in m] == [
        {"return": {}, "id": "late"}]


def test_state_reads_and_migrate_wait_for_the_commit() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, ADD_X)
    assert run(core, b, b'{"execute": "query-blockers", "id": "q"}'
                        b'{"execute": "query-version", "id": "v"}') == []
    assert core.blocked(b) and core.has_pending(b)
    group = taken(core)
    assert core.committed(group) == [b]
    out = run(core, b)
    assert [m.get("id") for m in out] == [None, "q", "v"]  # the event, then in order
    assert [blocker["id"] for blocker in out[1]["return"]] == ["x"]


def test_a_failed_commit_undoes_everything_pending_and_says_so() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    assert run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "keep", '
                        b'"id": "kept"}}') == []
    first = taken(core)
    core.committed(first)
    run(core, a), run(core, b)
    run(core, a, ADD_X + b'{"execute": "del-blocker", "arguments": {"id": "kept"}, "id": "del"}'
                 b'{"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-reboot"},'
                 b' "id": "mode"}{"execute": "query-version", "id": "v"}')
    run(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "s", "id": "later"}, '
                 b'"id": "b-add"}')
    group = taken(core)
    assert core.commit_failed(group, "cannot commit to /x/state.db: disk full") == []
    desc = "cannot commit to /x/state.db: disk full; nothing was changed"
    failed = {"class": "GenericError", "desc": desc}
    assert run(core, a) == [
        {"id": "add", "error": failed}, {"id": "del", "error": failed},
        {"id": "mode", "error": failed},
        {"return": core.table["query-version"].handler(a, {}), "id": "v"},  # type: ignore[operator]
    ]
    assert run(core, b) == [{"id": "b-add", "error": failed}]  # no event ever mentions x
    # Back to what is on disk: "kept" is there, x and "later" are not, the mode is normal.
    assert [blocker.id for blocker in core.registry.blockers()] == ["kept"]
    assert core.registry.mode == "normal"
    assert core.take_group() is None
    out = run(core, a, b'{"execute": "query-blockers", "id": "q"}')
    assert [blocker["id"] for blocker in out[-1]["return"]] == ["kept"]


def test_a_failed_commit_logs_what_it_undid_and_counts_every_failed_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Reported: the log kept "deleted blocker x" and "added blocker y" lines for
    # changes the failure undid, said nothing of them, and counted 3 failed
    # commands where 4 clients got the error (a refusal standing on a pending add).
    core = make()
    a = connected(core, 1)
    run(core, a, ADD_X)
    first = taken(core)
    core.committed(first)
    run(core, a)
    b, c, d, e = (connected(core, uid) for uid in (2, 3, 4, 5))
    run(core, b, b'{"execute": "del-blocker", "arguments": {"id": "x"}, "id": 1}')
    run(core, c, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x", '
                 b'"scope": "connection"}, "id": 2}')
    run(core, d, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "y"}, "id": 3}')
    run(core, e, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "y"}, "id": 4}')
    run(core, a, b'{"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-exec"}}')
    group = taken(core)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="migblockd"):
        core.commit_failed(group, "cannot commit to /x/state.db: disk full")
    assert [(r.levelname, r.getMessage(), getattr(r, "fields", {}).get("blocker_id"))
            for r in caplog.records] == [
        ("ERROR", "cannot commit to /x/state.db: disk full; 5 command(s) failed, their "
                  "changes undone" + UNTIL, None),
        ("WARNING", f"{b.label}: undone, the commit failed: deleted blocker x", "x"),
        ("WARNING", f"{c.label}: undone, the commit failed: added blocker x", "x"),
        ("WARNING", f"{d.label}: undone, the commit failed: added blocker y", "y"),
        ("WARNING", f"{a.label}: undone, the commit failed: migration mode cpr-exec (back to "
                    "normal)", None),
    ]
    assert [blocker.id for blocker in core.registry.blockers()] == ["x"]


def test_the_events_capability_is_logged_as_set_and_as_undone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Reported: the mode's changes had a line each, the events capability's none,
    # though both are kept on disk and both change what clients hear.
    core = make()
    a = connected(core, 1)
    caps = (b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
            b'[{"capability": "events", "state": %s}]}}')
    with caplog.at_level(logging.INFO, logger="migblockd"):
        run(core, a, caps % b"false")  # already off: nothing to say
        run(core, a, caps % b"true")
        group = taken(core)
        core.commit_failed(group, "disk full")
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if "capability" in r.getMessage()]
    assert said == [
        ("INFO", f"{a.label}: migration capability events on (was off)"),
        ("WARNING", f"{a.label}: undone, the commit failed: migration capability events on "
                    "(back to off)"),
    ]
    assert core.registry.events_enabled is False


def test_a_failed_commit_counts_the_commands_of_clients_gone_since(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = make()
    a = connected(core, 1)
    run(core, a, ADD_X)
    core.disconnect(a)  # its reply is dropped with it; its change still waits
    group = taken(core)
    with caplog.at_level(logging.INFO, logger="migblockd"):
        core.commit_failed(group, "disk full")
    assert "disk full; 1 command(s) failed, their changes undone" + UNTIL in caplog.messages


def test_failed_commits_in_a_row_say_what_to_do_once_and_are_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client retrying add-blocker on a full disk made an error line per retry,
    # each without a word of what to do, and nothing said when commits worked again.
    core = make()
    a = connected(core, 1)
    with caplog.at_level(logging.INFO, logger="migblockd"):
        for i in range(BURST + 40):
            run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x%d"}}'
                % i)
            core.commit_failed(taken(core), "cannot commit to /x/state.db: disk full")
            assert run(core, a)[-1]["error"]["desc"].endswith("disk full; nothing was changed")
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == BURST
        assert errors[0].endswith(UNTIL)
        assert not any(UNTIL in e for e in errors[1:])
        assert errors[-1].endswith("[more like it within 10 s are counted, not logged]")
        caplog.clear()
        run(core, a, ADD_X)
        core.committed(taken(core))
    assert caplog.messages[-1] == ("commits succeed again, after 50 failed (the last: cannot "
                                   "commit to /x/state.db: disk full)")


def test_a_failures_own_remedy_replaces_the_disks_advice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another program holding the database's write lock failed every commit, and
    # the log told the operator to free disk space or read the kernel's log.
    core = make()
    a = connected(core, 1)
    reason = "cannot commit to /x/state.db: database is locked (another program is writing to it)"
    remedy = "close the program that holds /x/state.db open for writing"
    with caplog.at_level(logging.INFO, logger="migblockd"):
        for i in range(2):
            run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x%d"}}'
                % i)
            core.commit_failed(taken(core), reason, remedy=remedy)
            assert run(core, a)[-1]["error"]["desc"] == f"{reason}; nothing was changed"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{reason}; 1 command(s) failed, their changes undone; every change fails until a "
        f"commit succeeds: {remedy}",
        f"{reason}; 1 command(s) failed, their changes undone"]


def test_a_new_reason_within_a_row_of_failed_commits_says_its_own_remedy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A full disk, then another program's write lock, in one row of failures: the
    # lock's line said no more than the reason, and the operator, told to free
    # space, never read what would end it.  Each reason says its remedy once a row.
    core = make()
    a = connected(core, 1)
    full = "cannot commit to /x/state.db: disk I/O error (its file system is full)"
    locked = ("cannot commit to /x/state.db: database is locked (another program is "
              "writing to it)")
    remedy = "close the program that holds /x/state.db open for writing"
    with caplog.at_level(logging.INFO, logger="migblockd"):
        for i, (reason, own) in enumerate([(full, None), (full, None), (locked, remedy),
                                           (locked, remedy), (full, None)]):
            run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x%d"}}'
                % i)
            core.commit_failed(taken(core), reason, remedy=own)
            run(core, a)
    undone = "; 1 command(s) failed, their changes undone"
    until = "; every change fails until a commit succeeds: "
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        full + undone + UNTIL,
        full + undone,
        locked + undone + until + remedy,
        locked + undone,
        full + undone]


def test_a_new_row_of_failed_commits_is_logged_after_commits_were_said_to_succeed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Within the 10 s of a throttled row, the first failure after "commits succeed
    # again" was counted, not logged: the log's last word said commits succeed
    # while every change failed (reproduced on a full 1 MiB tmpfs).  Alternating
    # failures and successes stay bounded all the same.
    core = make()
    a = connected(core, 1)
    reason = "cannot commit to /x/state.db: disk full"

    def fail(i: int) -> None:
        run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "f%d"}}'
            % i)
        core.commit_failed(taken(core), reason)
        run(core, a)

    def succeed(i: int) -> None:
        run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "s%d"}}'
            % i)
        core.committed(taken(core))
        run(core, a)

    with caplog.at_level(logging.INFO, logger="migblockd"):
        for i in range(BURST + 5):
            fail(i)
        succeed(0)
        caplog.clear()
        fail(100)
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
            f"{reason}; 1 command(s) failed, their changes undone" + UNTIL]
        caplog.clear()
        for i in range(200):
            succeed(i + 1)
            fail(i + 200)
    said = [r.getMessage() for r in caplog.records
            if r.levelname == "ERROR" or r.getMessage().startswith("commits succeed again")]
    assert BURST <= len(said) <= 3 * BURST, said


def test_connection_scoped_blockers_hold_nothing_but_wait_behind_what_does() -> None:
    core = make()
    a = connected(core, 1)
    # The first generated id reserves a chunk on disk: that is one durable change.
    run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", '
                 b'"scope": "connection"}}')
    group = core.take_group(wait=False)  # not for a, answered by the failure
    assert group is not None and [c.kind for c in group.changes] == ["id-floor"]
    core.committed(group)
    assert [m.get("event") for m in run(core, a)] == ["BLOCKER_ADDED", None]
    # The next generated ids are reserved already: nothing to commit.
    out = run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", '
                       b'"scope": "connection"}}')
    assert out[-1]["return"]["id"] == "#blocker1" and core.take_group() is None


def committed_kept(core: Core, *conns: Connection) -> None:
    run(core, conns[0], b'{"execute": "add-blocker", "arguments": {"reason": "keep", '
                        b'"id": "kept"}}')
    group = taken(core)
    core.committed(group)
    for conn in conns:
        run(core, conn)


FAILED = {"class": "GenericError", "desc": "disk full; nothing was changed"}


def fail_next_commit(core: Core) -> None:
    group = taken(core)
    core.commit_failed(group, "disk full")


def test_a_change_standing_on_an_uncommitted_one_fails_with_it() -> None:
    core = make()
    a, b, c = connected(core, 1), connected(core, 2), connected(core, 3)
    committed_kept(core, a, b, c)
    # b reuses the id that a's uncommitted delete freed, for a blocker that is
    # never stored: it stands on the delete, so it shares the delete's fate.
    run(core, a, b'{"execute": "del-blocker", "arguments": {"id": "kept"}, "id": "del"}')
    assert run(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "mine", '
                        b'"id": "kept", "scope": "connection"}, "id": "add"}') == []
    fail_next_commit(core)
    assert run(core, a) == [{"id": "del", "error": FAILED}]
    assert run(core, b) == [{"id": "add", "error": FAILED}]
    assert run(core, c) == []  # no event for either
    # What is on disk, and nothing else: the daemon-scoped blocker.
    (kept,) = core.registry.blockers()
    assert kept.id == "kept" and kept.connection is None


def test_a_generated_id_is_never_heard_of_before_its_reservation_is_on_disk() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r"}, "id": "a"}')
    # b's id comes from the chunk a's add reserves, which is not on disk yet.
    assert run(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "r", '
                        b'"scope": "connection"}, "id": "b"}') == []
    fail_next_commit(core)
    assert run(core, a) == [{"id": "a", "error": FAILED}]
    assert run(core, b) == [{"id": "b", "error": FAILED}]
    assert list(core.registry.blockers()) == []
    # The next generated id reserves its chunk again, and is heard of only once that is stored.
    assert run(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "r", '
                        b'"scope": "connection"}, "id": "again"}') == []
    group = core.take_group(wait=False)  # not for a, answered by the failure
    assert group is not None and [c.kind for c in group.changes] == ["id-floor"]
    core.committed(group)
    reply = run(core, b)[-1]
    assert reply["id"] == "again" and reply["return"]["id"] == "#blocker2"


def test_a_refusal_standing_on_an_uncommitted_change_takes_the_commits_outcome() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    for fails in (True, False):
        run(core, a, ADD_X)
        assert run(core, b, ADD_X) == []  # "Duplicate ID", but x is not on disk yet
        group = taken(core)
        if fails:
            core.commit_failed(group, "disk full")
            # x never existed: b hears of the failed commit, not of a duplicate.
            assert run(core, b) == [{"id": "add", "error": FAILED}]
        else:
            core.committed(group)
            out = run(core, b)
            assert out[0]["event"] == "BLOCKER_ADDED"
            assert out[1]["error"]["desc"] == (
                f"Duplicate blocker ID 'x', which belongs to {who(1)}")
        run(core, a)


def test_a_client_gone_while_waiting_still_has_its_request_run() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, ADD_X)
    core.receive_data(b, b'{"execute": "add-blocker", "arguments": {"reason": "mine", '
                         b'"id": "held", "scope": "connection"}}'
                         b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}}')
    core.disconnect(b)
    assert b in core.connections  # its migrate waits for the commit
    group = taken(core)
    assert core.committed(group) == []
    assert b not in core.connections
    # The migrate ran (refused by the blocker), then b's blocker went with it.
    assert [blocker.id for blocker in core.registry.blockers()] == ["x"]
    out = lines(core.data_to_send(a))
    assert [(m.get("event"), m.get("data", {}).get("id")) for m in out] == [
        ("BLOCKER_ADDED", "x"), (None, None), ("BLOCKER_ADDED", "held"),
        ("BLOCKER_DELETED", "held")]


def test_generated_ids_are_reserved_in_chunks_and_never_reused_after_undo() -> None:
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    registry.add("r")
    changes = registry.take_changes()
    assert [(c.kind, c.old, c.new) for c in changes if c.kind == "id-floor"] == [
        ("id-floor", 0, ID_CHUNK)]
    for _ in range(ID_CHUNK - 1):
        registry.add("r")
    assert not [c for c in registry.take_changes() if c.kind == "id-floor"]
    registry.add("r")
    floor = [c for c in registry.take_changes() if c.kind == "id-floor"]
    assert [(c.old, c.new) for c in floor] == [(ID_CHUNK, 2 * ID_CHUNK)]
    registry.undo(floor, alive=lambda connection: True)
    # The floor went back, but the serial did not: #blocker1024 is never handed out again.
    assert registry.add("r").id == f"#blocker{ID_CHUNK + 1}"


def test_restore_keeps_ids_order_mode_and_events() -> None:
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    rows = [Blocker("b", "second", ("normal",), False, "daemon", Owner(1, 2, 3), 10.0, 7),
            Blocker("a", "first", ("normal", "cpr-reboot"), True, "daemon", None, 5.0, 3)]
    registry.restore(sorted(rows, key=lambda b: b.seq), mode="cpr-reboot", events=True,
                     id_floor=2048)
    assert [b.id for b in registry.blockers()] == ["a", "b"]
    assert registry.blocked_reasons() == ["first"]  # cpr-reboot's list
    assert registry.mode == "cpr-reboot" and registry.events_enabled
    blocker = registry.add("new")
    assert blocker.id == "#blocker2048" and blocker.seq == 8


def test_a_reader_woken_after_another_change_waits_for_the_next_commit() -> None:
    # Found by the soak: a reader woken by a commit, overtaken in the same turn by
    # another client's change, was never woken again, and its client waited forever.
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, ADD_X)
    assert run(core, b, b'{"execute": "query-blockers", "id": "q"}') == []
    first = taken(core)
    assert core.committed(first) == [b]
    run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "y"}}')
    # b's turn comes after a's: its read must wait again, for y's commit.
    assert [m.get("id") for m in run(core, b)] == [None]  # x's event, no reply yet
    second = taken(core)
    assert core.committed(second) == [b]
    out = run(core, b)
    assert [blocker["id"] for blocker in out[-1]["return"]] == ["x", "y"]


def test_held_output_marks_nobody_dirty_until_its_commit() -> None:
    # A connection is only worth a flush once its output may go: until the
    # commit, every client's event and the reply wait, and no turn wakes anyone.
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    core.take_dirty()
    core.receive_data(a, ADD_X)
    core.execute(a, 32)
    assert core.take_dirty() == []
    group = taken(core)
    core.committed(group)
    assert set(core.take_dirty()) == {a, b}


def test_one_stamp_per_group() -> None:
    # Every change of a group shares its stamp, so a session lets a group's
    # output go in one run; a change made while the group commits gets the next.
    ledger = Ledger()
    conn = connected(make(), 1)
    ledger.record(conn, [])
    ledger.record(conn, [])
    assert ledger.open_stamp == 1
    group = ledger.take_group()
    assert group is not None and group.stamp == 1
    ledger.record(conn, [])
    assert ledger.open_stamp == 2
    ledger.done(group)
    assert ledger.uncommitted and ledger.open_stamp == 2
    second = ledger.take_group()
    assert second is not None and second.stamp == 2
    ledger.failed()
    assert not ledger.uncommitted and ledger.open_stamp == 0
    ledger.record(conn, [])
    assert ledger.open_stamp == 3  # never a stamp that already counts as on disk


def test_a_pipelining_client_stops_at_a_turns_worth_of_held_replies() -> None:
    core = make()
    a = connected(core, 1)
    reason = "r" * 1000
    requests = b"".join(
        json.dumps({"execute": "add-blocker", "id": i,
                    "arguments": {"reason": reason, "id": f"b{i}"}}).encode()
        for i in range(300))
    # The adds run until their held replies are a turn's worth...
    run(core, a, requests)
    group = taken(core)
    # ... then a waits for their commit, with the rest of its requests unread.
    assert core.blocked(a) and core.has_pending(a)
    held = len(core.registry.blockers())
    assert 20 < held < 100, held
    assert core.execute(a, 32) == 0
    woken = core.committed(group)
    assert woken == [a]  # released, and free to go on
    out = run(core, a)
    assert len([m for m in out if "return" in m]) == held  # the first group's adds
    while core.has_pending(a) or core.has_uncommitted():
        group = taken(core)
        core.committed(group)
        run(core, a)
    assert len(core.registry.blockers()) == 300


def pipelined_adds(count: int, first: int = 0) -> bytes:
    return b"".join(
        json.dumps({"execute": "add-blocker", "id": i,
                    "arguments": {"reason": "r" * 1000, "id": f"b{i}"}}).encode()
        for i in range(first, first + count))


def test_a_client_stopped_by_held_replies_goes_on_after_a_failed_commit_too() -> None:
    core = make()
    a = connected(core, 1)
    run(core, a, pipelined_adds(300))
    assert core.blocked(a)
    group = taken(core)
    assert core.commit_failed(group, "disk full") == [a]  # else it would wait for ever
    assert not core.blocked(a) and core.has_pending(a)


def test_a_connection_scoped_blocker_gone_with_its_connection_stays_gone() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "mine", '
                 b'"scope": "connection"}}')
    run(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "y"}}')
    group = taken(core)  # y's commit is in flight, and will fail
    run(core, a, b'{"execute": "del-blocker", "arguments": {"id": "mine"}}')
    core.disconnect(a)
    core.commit_failed(group, "disk full")
    # Undoing the delete would leave "mine" with no connection to end it.
    assert list(core.registry.blockers()) == []


def test_a_quota_refusal_standing_on_an_uncommitted_add_takes_the_commits_outcome() -> None:
    core = make(Quotas(max_blockers=1))
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, ADD_X)
    assert run(core, b, b'{"execute": "add-blocker", "arguments": {"reason": "r", '
                        b'"id": "y"}, "id": "add"}') == []  # over the quota, held
    fail_next_commit(core)
    # x never existed: b hears of the failed commit, not of a full registry.
    assert run(core, b) == [{"id": "add", "error": FAILED}]


def test_an_out_of_band_request_runs_while_held_replies_stop_the_in_band_ones() -> None:
    core = make()
    a = core.connect(Owner(pid=1, uid=1, gid=1))
    core.data_to_send(a)
    run(core, a, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    # About 50 run before their replies stop the rest: the request is within the
    # in-band requests the session looks ahead of (migblockd.qmp.session.LOOKAHEAD).
    run(core, a, pipelined_adds(100))
    assert core.blocked(a)
    run(core, a, b'{"exec-oob": "query-blockers", "id": "oob"}')
    # It ran (and, reading state, waits for the commit), ahead of the waiting adds.
    assert a.waiting is not None and a.waiting.id == "oob"


def test_the_counters_count_what_a_failed_commit_undid_as_failed() -> None:
    # Measured on a full disk: 200 add-blocker all answered "cannot commit", yet
    # migblockd_commands_total{command="add-blocker",result="ok"} and
    # migblockd_blockers_added_total said 200, and result="error" 0.
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    stats = core.stats
    run(core, a, ADD_X)
    run(core, b, b'{"execute": "query-version"}')  # held behind the add, not failed with it
    assert stats.commands["add-blocker"].ok == stats.blockers_added == 0  # not yet known
    core.commit_failed(taken(core), "cannot commit to /x/state.db: disk full")
    assert run(core, a)[-1]["error"]["desc"].endswith("nothing was changed")
    assert (stats.commands["add-blocker"].ok, stats.commands["add-blocker"].errors) == (0, 1)
    assert stats.commands["query-version"].ok == 1
    assert stats.blockers_added == 0
    run(core, a, ADD_X)
    core.committed(taken(core))
    assert [m.get("event") for m in run(core, a)] == ["BLOCKER_ADDED", None]
    assert (stats.commands["add-blocker"].ok, stats.commands["add-blocker"].errors) == (1, 1)
    assert stats.blockers_added == 1
    assert sum(stats.commands["add-blocker"].latency.counts) == 2
