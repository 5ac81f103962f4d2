"""Group commit's cohort, without a disk: the next group waits for the writers
the last commit answered, and for no one else, and not for long."""

from __future__ import annotations

import json

import pytest
from test_core_durable import connected, lines, make, run
from test_core_gate import CONTRACT, PATH

from migblockd.access import Policy, Role
from migblockd.config import Config
from migblockd.connection import Connection
from migblockd.core import Core
from migblockd.gate import GateHandlers
from migblockd.ledger import COHORT_ENOUGH, COHORT_LIMIT, COHORT_WAIT
from migblockd.qemu_facts import QemuFacts
from migblockd.registry import FakeClock, Owner, Registry


def add(n: int) -> bytes:
    return json.dumps({"execute": "add-blocker", "id": n,
                       "arguments": {"reason": "r", "id": f"b{n}"}}).encode()


def clock(core: Core) -> FakeClock:
    fake = core.registry.clock
    assert isinstance(fake, FakeClock)
    return fake


def commit(core: Core) -> None:
    group = core.take_group()
    assert group is not None
    core.committed(group)


def writers(core: Core, *conns: Connection) -> None:
    """Each of ``conns`` adds a blocker, all committed in one group: they are
    the cohort of the next."""
    for n, conn in enumerate(conns):
        run(core, conn, add(100 + n))
    commit(core)
    for conn in conns:
        assert any("return" in m for m in lines(core.data_to_send(conn)))


def test_the_next_group_waits_for_each_writer_the_last_commit_answered() -> None:
    core = make()
    a, b, c = (connected(core, uid) for uid in (1, 2, 3))
    writers(core, a, b, c)
    run(core, a, add(1))
    assert core.take_group() is None  # b and c may be about to send theirs
    run(core, b, add(2))
    assert core.take_group() is None
    run(core, c, add(3))
    group = core.take_group()
    assert group is not None
    assert [change.blocker.id for change in group.changes if change.blocker] == [
        "b1", "b2", "b3"]
    assert group.writers == [a, b, c]


def test_a_lone_writer_never_waits() -> None:
    core = make()
    a = connected(core, 1)
    for n in range(3):
        run(core, a, add(n))
        assert core.next_deadline() is None  # no timer: nothing to wait for
        commit(core)


def test_a_writer_that_went_quiet_is_waited_for_a_moment_only() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    writers(core, a, b)
    run(core, a, add(1))  # b stays quiet
    deadline = core.next_deadline()
    assert deadline == pytest.approx(clock(core).monotonic() + COHORT_WAIT)
    clock(core).advance(COHORT_WAIT / 2)
    assert core.take_group() is None
    clock(core).advance(COHORT_WAIT / 2)
    group = core.take_group()
    assert group is not None and group.writers == [a]
    # The group after that waits for a alone: b made no change in it.
    core.committed(group)
    run(core, a, add(2))
    assert core.take_group() is not None


def test_each_arrival_gives_the_rest_of_the_cohort_more_time() -> None:
    # A turn that runs many arrivals can outlast COHORT_WAIT: what counts is
    # how long the cohort has been silent, not how long ago it was answered.
    core = make()
    a, b, c = (connected(core, uid) for uid in (1, 2, 3))
    writers(core, a, b, c)
    clock(core).advance(COHORT_WAIT * 0.9)
    run(core, a, add(1))
    clock(core).advance(COHORT_WAIT * 0.9)
    run(core, b, b'{"execute": "query-version"}')  # any request counts
    clock(core).advance(COHORT_WAIT * 0.9)
    assert core.take_group() is None  # 2.7 waits after the release, 0.9 after b
    clock(core).advance(COHORT_WAIT * 0.1)
    assert core.take_group() is not None


def test_observers_readers_and_the_departed_are_not_waited_for() -> None:
    core = make()
    a, watcher, reader, gone = (connected(core, uid) for uid in (1, 2, 3, 4))
    run(core, reader, b'{"execute": "query-version"}')
    writers(core, a, gone)
    assert lines(core.data_to_send(watcher))  # it heard the events
    core.disconnect(gone)
    run(core, a, add(1))
    # watcher heard events and reader got a reply from the same commit, but
    # made no change: their next requests would not join the group anyway.
    assert core.take_group() is not None


def test_a_writer_whose_later_request_waits_is_not_waited_for() -> None:
    # A pipelining writer's next request is already in: it ran, and waits for
    # the next commit, so waiting for it would only wait for ourselves.
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, add(1))
    run(core, b, add(2))
    first = core.take_group()
    assert first is not None
    run(core, a, add(3))  # made while the first group commits
    core.committed(first)
    assert core.take_group() is None  # b may still send its next
    run(core, b, add(4))
    assert core.take_group() is not None


def test_a_failed_commit_leaves_no_cohort() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    writers(core, a, b)
    run(core, a, add(1))
    group = core.take_group(wait=False)
    assert group is not None
    core.commit_failed(group, "disk full")
    run(core, a, add(2))  # a retries; b is not waited for after a failure
    assert core.take_group() is not None


def test_stopping_commits_without_waiting() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    writers(core, a, b)
    run(core, a, add(1))
    assert core.take_group() is None
    assert core.take_group(wait=False) is not None


def test_a_writer_whose_next_read_waits_for_the_commit_is_not_waited_for() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    run(core, a, add(1) + b'{"execute": "query-blockers", "id": "q"}')
    run(core, b, add(2))
    first = core.take_group()
    assert first is not None and first.writers == [a, b]
    run(core, b, add(3))  # made while the first group commits
    core.committed(first)
    # a's read is in already, and waits for b's change to be on disk.
    assert a.waiting is not None
    assert core.take_group() is not None


def gated() -> Core:
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    facts = QemuFacts(PATH, connected=True, version="7.2.22",
                      commands={"migrate": frozenset({"uri"})})
    handlers = GateHandlers(CONTRACT, registry, facts, passthrough=())
    return Core(CONTRACT, registry, Config().limits, handlers=handlers,
                policy=Policy.of(Role.ADMIN), durable=True)


def test_a_lone_gated_writer_never_waits_for_itself() -> None:
    # Gating QEMU, an add first asks QEMU whether it migrates: a client's
    # second add may still wait for QEMU's answer when the first is committed.
    core = gated()
    a = core.connect(Owner(1, 0, 0))
    core.data_to_send(a)
    run(core, a, b'{"execute": "qmp_capabilities"}')
    core.receive_data(a, add(1) + add(2))
    core.execute(a, 32)
    assert len(core.take_calls()) == 1
    core.resume(a, {})  # QEMU does not migrate: add 1 is made
    core.execute(a, 32)
    assert len(core.take_calls()) == 1  # add 2 asks QEMU
    group = core.take_group()
    assert group is not None and group.writers == [a]
    core.committed(group)
    core.resume(a, {})  # QEMU answers add 2 after the commit
    assert core.take_group() is not None


def test_a_group_with_enough_changes_stops_waiting() -> None:
    core = make()
    a, b = connected(core, 1), connected(core, 2)
    writers(core, a, b)
    many = b"".join(add(n) for n in range(COHORT_ENOUGH - 1))
    run(core, a, many)  # b stays quiet
    assert core.take_group() is None
    run(core, a, add(COHORT_ENOUGH))
    assert core.next_deadline() is None
    group = core.take_group()
    assert group is not None and len(group.changes) == COHORT_ENOUGH


def test_a_cohort_that_trickles_in_is_waited_for_a_few_milliseconds_at_most() -> None:
    core = make()
    conns = [connected(core, uid) for uid in range(1, 18)]
    writers(core, *conns)
    released = clock(core).monotonic()
    for n, conn in enumerate(conns[:-1]):
        clock(core).advance(COHORT_WAIT * 0.9)  # each in time to keep the wait going
        run(core, conn, add(n))
        if clock(core).monotonic() < released + COHORT_LIMIT:
            assert core.take_group() is None
    # The last one has not come and the others kept coming, but the limit is past.
    assert clock(core).monotonic() >= released + COHORT_LIMIT
    assert core.take_group() is not None
