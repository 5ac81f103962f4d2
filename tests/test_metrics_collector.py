"""The metrics collector over a core with no sockets: every counter and gauge after a script.

The core runs requests from bytes; the collector is scraped through prometheus_client's
own text exposition and read back with its own parser, so what is checked is what
Prometheus would store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from metricstext import Scrape, baseline, commands, key
from prometheus_client import generate_latest

from migblockd import exposition
from migblockd.access import Policy, Quotas, Role
from migblockd.config import Config
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.gate import GateHandlers
from migblockd.guard import AccessDenied, OverQuota
from migblockd.metrics import metrics_registry
from migblockd.qemu_facts import QemuError, QemuFacts, QemuUnavailable
from migblockd.qmp.errors import QMPError
from migblockd.registry import (
    Blocker,
    DuplicateId,
    EmptyModes,
    FakeClock,
    InvalidId,
    InvalidUri,
    MigrationBlocked,
    MigrationBusy,
    MigrationInProgress,
    NoPausedMigration,
    OnlyMigratable,
    Owner,
    Registry,
    errors,
)
from migblockd.scrape import MetricsApp
from migblockd.stats import Histogram, refusal_reason

CONTRACT = Contract.load()
#: Every command but the session's own (its replies count as protocol replies).
COMMANDS = [name for name in CONTRACT.commands if name != "qmp_capabilities"]
# uids: root (always admin), and two that no user database names
ADMIN, CLIENT, OBSERVER = 0, 3_999_990, 3_999_991


def make(*, durable: bool = False, only_migratable: bool = False) -> tuple[Core, FakeClock]:
    clock = FakeClock()
    registry = Registry(CONTRACT.enums["MigMode"], migration_time=1.0, clock=clock,
                        only_migratable=only_migratable)
    core = Core(CONTRACT, registry, Config().limits, max_clients=3, durable=durable,
                policy=Policy.of(Role.CLIENT, users={OBSERVER: Role.OBSERVER}),
                quotas=Quotas(max_blockers_per_uid=1))
    return core, clock


def scrape(core: Core) -> Scrape:
    return Scrape.parse(generate_latest(metrics_registry(core)).decode())


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.split(b"\r\n")[:-1]]


def run(core: Core, conn: Connection, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Send the requests (one write), run them, and return the replies (events dropped)."""
    core.receive_data(conn, b"".join(json.dumps(r).encode() for r in requests))
    while core.has_pending(conn) and not core.blocked(conn) and core.execute(conn, 32):
        pass
    return [m for m in lines(core.data_to_send(conn)) if "event" not in m]


def connect(core: Core, uid: int) -> Connection:
    conn = core.connect(Owner(pid=uid + 1, uid=uid, gid=uid))
    core.data_to_send(conn)
    assert run(core, conn, {"execute": "qmp_capabilities"}) == [{"return": {}}]
    return conn


def add(reason: str, **args: Any) -> dict[str, Any]:
    return {"execute": "add-blocker", "arguments": {"reason": reason, **args}}


def outcome(replies: list[dict[str, Any]]) -> list[str]:
    return ["ok" if "return" in r else r["error"]["desc"] for r in replies]


def test_a_fresh_core_shows_every_series_at_zero_and_nothing_else() -> None:
    core, _ = make()
    metrics = scrape(core)
    assert metrics.plain() == baseline(COMMANDS, durable=core.durable)
    assert metrics.types["migblockd_blockers"] == "gauge"
    assert metrics.types["migblockd_blockers_added"] == "counter"
    assert metrics.types["migblockd_command_duration_seconds"] == "histogram"
    assert key("migblockd_blocked_since_seconds") not in metrics.samples  # nothing blocks
    assert metrics.value("process_open_fds") > 0  # prometheus_client's process metrics


def test_every_counter_and_gauge_after_a_scripted_session() -> None:
    core, clock = make(only_migratable=True)
    admin, client, observer = connect(core, ADMIN), connect(core, CLIENT), connect(core, OBSERVER)
    assert core.connect(Owner(9, 9, 9)).refused  # max-clients=3
    assert outcome(run(core, admin,
                       add("vfio", id="vfio", modes=["cpr-reboot"]),
                       add("dump", id="dump", internal=True),
                       add("again", id="vfio", modes=["cpr-reboot"]),
                       add("tpm"),
                       add("bad id", id="1bad", modes=["cpr-exec"]),
                       add("none", modes=[]),
                       {"execute": "add-blocker", "arguments": {}},  # refused by the schema
                       {"execute": "migrate", "arguments": {"uri": "tcp:h:1"}},
                       {"execute": "migrate", "arguments": {"uri": "nowhere"}},
                       {"execute": "del-blocker", "arguments": {"id": "dump"}},
                       {"execute": "del-blocker", "arguments": {"id": "dump"}},
                       {"execute": "migrate", "arguments": {"uri": "tcp:h:1"}},
                       add("late", internal=True),
                       {"execute": "migrate", "arguments": {"uri": "tcp:h:2"}},
                       {"execute": "migrate_cancel"},
                       {"execute": "query-migrate"})) == [
        "ok", "ok", "Duplicate blocker ID 'vfio'",
        "disallowing migration blocker (--only-migratable) for: tpm",
        "Parameter 'id' expects an identifier", "Parameter 'modes' expects a non-empty list",
        "Parameter 'reason' is missing", "dump",
        "unknown migration protocol: nowhere", "ok", "Blocker 'dump' not found",
        "ok", "disallowing migration blocker (migration/snapshot in progress) for: late",
        "There's a migration process in progress", "ok", "ok"]
    assert outcome(run(core, client, add("mine", id="mine", modes=["cpr-transfer"]),
                       add("more", modes=["cpr-transfer"]),
                       {"execute": "migrate", "arguments": {"uri": "tcp:h:1"}}))[:2] == [
        "ok", f"Too many migration blockers for uid {CLIENT}: it owns 1, "
        "max-blockers-per-uid is 1"]
    assert outcome(run(core, observer, add("o", modes=["cpr-transfer"]))) == [
        f"Permission denied: add-blocker needs role client, but uid {OBSERVER} has role "
        "observer"]
    core.disconnect(observer)
    held = connect(core, ADMIN)
    assert outcome(run(core, held, add("held", id="held", modes=["cpr-exec"],
                                       scope="connection"))) == ["ok"]
    core.disconnect(held)
    assert outcome(run(core, admin, {"execute": "migrate", "arguments": {"uri": "tcp:h:3"}},
                       {"execute": "query-migrate"})) == ["ok", "ok"]
    clock.advance(1.0)
    core.tick()  # completed
    assert outcome(run(core, admin, {"execute": "migrate-set-parameters",
                                     "arguments": {"mode": "cpr-reboot"}})) == ["ok"]

    expected = baseline(COMMANDS, durable=core.durable)
    expected.update({
        key("migblockd_migration_mode", mode="normal"): 0,
        key("migblockd_migration_mode", mode="cpr-reboot"): 1,
        key("migblockd_blockers", source="migblockd", mode="cpr-reboot"): 1,  # vfio
        key("migblockd_blockers", source="migblockd", mode="cpr-transfer"): 1,  # mine
        key("migblockd_blocked_since_seconds"): 1_700_000_000.25,  # vfio's, on the FakeClock
        key("migblockd_blockers_added_total"): 4,  # vfio, dump, mine, held
        key("migblockd_blockers_deleted_total", cause="command"): 1,
        key("migblockd_blockers_deleted_total", cause="connection-closed"): 1,
        key("migblockd_blockers_refused_total", reason="duplicate-id"): 1,
        key("migblockd_blockers_refused_total", reason="only-migratable"): 1,
        key("migblockd_blockers_refused_total", reason="invalid"): 2,  # the id, no modes
        key("migblockd_blockers_refused_total", reason="busy"): 1,
        key("migblockd_blockers_refused_total", reason="quota"): 1,
        key("migblockd_blockers_refused_total", reason="access"): 1,
        key("migblockd_migrations_started_total"): 2,
        key("migblockd_migrations_refused_total", reason="blocked"): 1,
        key("migblockd_migrations_refused_total", reason="invalid"): 1,
        key("migblockd_migrations_refused_total", reason="in-progress"): 1,
        key("migblockd_migrations_refused_total", reason="access"): 1,
        key("migblockd_migrations_ended_total", status="completed"): 1,
        key("migblockd_migrations_ended_total", status="cancelled"): 1,
        key("migblockd_clients"): 2,  # admin and client
        key("migblockd_connections_total"): 5,
        key("migblockd_connections_refused_total", reason="max-clients"): 1,
        # Four negotiations and the add-blocker without a reason.
        key("migblockd_protocol_replies_total"): 5,
    })
    commands(expected, "add-blocker", ok=4, error=7)
    commands(expected, "migrate", ok=2, error=4)
    commands(expected, "del-blocker", ok=1, error=1)
    commands(expected, "migrate_cancel", ok=1)
    commands(expected, "query-migrate", ok=2)
    commands(expected, "migrate-set-parameters", ok=1)
    metrics = scrape(core)
    assert metrics.plain() == expected
    buckets, seconds = metrics.histogram("migblockd_command_duration_seconds",
                                         command="add-blocker")
    assert buckets[-1][1] == 11 and seconds > 0


def test_refusals_of_other_commands_than_add_and_migrate_count_as_their_errors() -> None:
    # service.md once said the *_refused_total families count every refusal the log
    # bounds: a del-blocker of another uid's blocker, or a command refused for the
    # role, is counted by none of them, only as its command's error.
    core, _ = make()
    admin, client, observer = connect(core, ADMIN), connect(core, CLIENT), connect(core, OBSERVER)
    assert outcome(run(core, admin, add("root's", id="vfio0", modes=["normal"]))) == ["ok"]
    assert [desc.split(":")[0] for desc in outcome(run(
        core, client, {"execute": "del-blocker", "arguments": {"id": "vfio0"}},
        {"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-reboot"}},
        {"execute": "migrate_cancel"}))] == ["Permission denied"] * 3
    assert outcome(run(core, observer, {"execute": "del-blocker",
                                        "arguments": {"id": "vfio0"}}))[0].startswith(
        "Permission denied: del-blocker needs role client")
    expected = baseline(COMMANDS, durable=core.durable)
    expected.update({
        key("migblockd_blockers", source="migblockd", mode="normal"): 1,
        key("migblockd_blockers_added_total"): 1,
        key("migblockd_clients"): 3,
        key("migblockd_connections_total"): 3,
        key("migblockd_protocol_replies_total"): 3,
    })
    commands(expected, "add-blocker", ok=1)
    commands(expected, "del-blocker", error=2)
    commands(expected, "migrate-set-parameters", error=1)
    commands(expected, "migrate_cancel", error=1)
    metrics = scrape(core)
    plain = metrics.plain()
    del plain[key("migblockd_blocked_since_seconds")]  # vfio0's: not this test's concern
    assert plain == expected


def test_blocked_since_is_the_oldest_blocker_of_the_current_mode() -> None:
    core, clock = make()
    admin = connect(core, ADMIN)
    run(core, admin, add("a", id="a", modes=["normal"]))
    clock.advance(60)
    run(core, admin, add("b", id="b"))
    start = 1_700_000_000.25
    assert scrape(core).value("migblockd_blocked_since_seconds") == start
    run(core, admin, {"execute": "del-blocker", "arguments": {"id": "a"}})
    assert scrape(core).value("migblockd_blocked_since_seconds") == start + 60
    run(core, admin, {"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-exec"}})
    assert scrape(core).value("migblockd_blocked_since_seconds") == start + 60  # b: every mode
    run(core, admin, {"execute": "del-blocker", "arguments": {"id": "b"}})
    assert key("migblockd_blocked_since_seconds") not in scrape(core).samples


def test_gate_counts_qemu_7_2s_own_blockers_in_the_mode_query_blockers_lists_them() -> None:
    # Found by review of 295d206: query-blockers lists the blockers of a QEMU older
    # than 8.2 (no modes: they refuse its only migration, a normal one) in mode
    # normal, whatever migblockd's mode; the gauge still counted them under
    # migblockd's mode, so that in mode cpr-reboot a scrape said a cpr-reboot
    # blocker of QEMU's that query-blockers with mode cpr-reboot does not list.
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    registry.restore([], mode="cpr-reboot", events=False, id_floor=0)
    facts = QemuFacts(Path("/run/vm.qmp"), connected=True, version="7.2.0",
                      commands={"migrate": frozenset({"uri"})})
    core = Core(CONTRACT, registry, Config().limits, policy=Policy.of(Role.ADMIN),
                handlers=GateHandlers(CONTRACT, registry, facts))
    conn = connect(core, ADMIN)
    run(core, conn, {"execute": "query-blockers"})
    assert len(core.take_calls()) == 1
    core.resume(conn, {"blocked-reasons": ["vdi"]})
    [reply] = run(core, conn)
    assert [b["modes"] for b in reply["return"]] == [["normal"]]
    metrics = scrape(core)
    assert metrics.value("migblockd_blockers", source="qemu", mode="normal") == 1
    assert key("migblockd_blockers", source="qemu", mode="cpr-reboot") not in metrics.samples


def test_commits_are_timed_and_failures_counted_only_with_durable_state() -> None:
    core, _ = make(durable=True)
    core.stats.commit(2_000_000, True)  # 2 ms, as the server reports a group commit
    core.stats.commit(30_000_000, False)
    metrics = scrape(core)
    buckets, seconds = metrics.histogram("migblockd_commit_duration_seconds")
    assert dict(buckets)[0.0025] == 1 and dict(buckets)[0.05] == 2
    assert seconds == pytest.approx(0.032)
    assert metrics.value("migblockd_commit_failures_total") == 1
    plain, _ = make()
    assert "migblockd_commit_failures" not in scrape(plain).types


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    histogram = Histogram((0.001, 0.01))
    for ns in (1, 1_000_000, 1_000_001, 10_000_000, 10_000_001):
        histogram.observe(ns)
    assert histogram.counts == [2, 2, 1]
    assert histogram.total_ns == 22_000_003


def test_refusal_reasons_come_from_the_type_of_what_refused() -> None:
    blocker = Blocker("b", "r", ("normal",), False, "daemon", None, 0.0, 0)
    assert [refusal_reason(exc) for exc in (
        AccessDenied("x"), OverQuota("x"), EmptyModes(), InvalidId("1"), InvalidUri("u"),
        QMPError("x"), DuplicateId("d"), OnlyMigratable("r"), MigrationBusy("r"),
        MigrationBlocked(blocker), MigrationInProgress(), NoPausedMigration(),
        QemuError("GenericError", "no"), QemuUnavailable("gone"), KeyError("bug"))] == [
        "access", "quota", "invalid", "invalid", "invalid", "invalid", "duplicate-id",
        "only-migratable", "busy", "blocked", "in-progress", "not-paused", "qemu",
        "qemu-unavailable", "internal"]


def test_no_refusal_of_the_registry_counts_as_a_bug() -> None:
    # Reported: an empty reason and a resume were counted as "internal" (a bug).
    refusals = [cls for cls in vars(errors).values() if isinstance(cls, type)
                and issubclass(cls, errors.BlockerError) and cls is not errors.BlockerError
                and cls is not errors.NotFound]  # del-blocker's, counted by no reason
    assert len(refusals) >= 11
    for cls in refusals:
        assert refusal_reason(cls.__new__(cls)) != "internal", cls


def test_gate_reports_the_link_qemus_own_blockers_and_how_its_migrations_end() -> None:
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    facts = QemuFacts(Path("/run/vm.qmp"), connected=True, version="7.2.0",
                      commands={"migrate": frozenset({"uri"})})
    core = Core(CONTRACT, registry, Config().limits, policy=Policy.of(Role.ADMIN),
                handlers=GateHandlers(CONTRACT, registry, facts))
    conn = connect(core, ADMIN)

    def answer(*values: object) -> list[dict[str, Any]]:
        for value in values:
            assert len(core.take_calls()) == 1
            if isinstance(value, Exception):
                core.resume(conn, error=value)
            else:
                core.resume(conn, value)
        return run(core, conn)

    metrics = scrape(core)
    assert metrics.value("migblockd_qemu_connected") == 1
    assert metrics.value("migblockd_qemu_unresponsive") == 0
    facts.timed_out = lambda: True  # a forwarded command timed out (the link says so)
    assert scrape(core).value("migblockd_qemu_unresponsive") == 1
    facts.timed_out = lambda: False
    assert key("migblockd_blockers", source="qemu", mode="normal") not in metrics.samples
    run(core, conn, {"execute": "query-blockers"})
    answer({"blocked-reasons": ["vdi", "sev"]})
    assert scrape(core).value("migblockd_blockers", source="qemu", mode="normal") == 2
    run(core, conn, {"execute": "migrate", "arguments": {"uri": "exec:cat"}})
    assert outcome(answer({"blocked-reasons": ["vdi"]},
                          QemuError("GenericError", "vdi"))) == ["vdi"]
    run(core, conn, {"execute": "migrate", "arguments": {"uri": "exec:cat"}})
    assert outcome(answer({}, {})) == ["ok"]
    facts.saw_status("active")
    facts.saw_status("completed")  # QEMU's MIGRATION event, as the bridge relays it
    facts.saw_status("completed")  # a second sighting (query-migrate) counts once
    run(core, conn, {"execute": "migrate", "arguments": {"uri": "exec:cat"}})
    assert outcome(answer(QemuUnavailable("gone"))) == ["gone"]
    facts.connected = False
    metrics = scrape(core)
    assert metrics.value("migblockd_qemu_connected") == 0
    assert key("migblockd_blockers", source="qemu", mode="normal") not in metrics.samples
    assert metrics.value("migblockd_migrations_started_total") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="completed") == 1
    assert metrics.value("migblockd_migrations_refused_total", reason="qemu") == 1
    assert metrics.value("migblockd_migrations_refused_total", reason="qemu-unavailable") == 1



def test_migrations_started_never_goes_down_while_a_resume_waits_for_a_commit() -> None:
    # Found by review: the counter was migrate's successes less the resumes the
    # gate had counted; a resume's success is counted when its reply is released
    # (after the commit another client's change holds it for), the resume at once:
    # in between, a scrape saw the counter go down, which Prometheus takes for a
    # restart of the daemon.
    registry = Registry(CONTRACT.enums["MigMode"], clock=FakeClock())
    facts = QemuFacts(Path("/run/vm.qmp"), connected=True, version="7.2.0",
                      learnt=True, commands={"migrate": frozenset({"uri", "resume"})})
    core = Core(CONTRACT, registry, Config().limits, durable=True,
                policy=Policy.of(Role.ADMIN), handlers=GateHandlers(CONTRACT, registry, facts))
    a, b = connect(core, ADMIN), connect(core, ADMIN + 1)

    def answered(conn: Connection, request: dict[str, Any], *answers: object) -> None:
        core.receive_data(conn, json.dumps(request).encode())
        core.execute(conn, 32)
        for answer in answers:
            assert len(core.take_calls()) == 1
            core.resume(conn, answer)

    def commit() -> None:
        group = core.take_group()
        assert group is not None
        core.committed(group)

    answered(b, add("r", id="x", modes=["cpr-reboot"]), {})
    commit()
    answered(a, {"execute": "migrate", "arguments": {"uri": "tcp:h:1"}}, {}, {})
    assert scrape(core).value("migblockd_migrations_started_total") == 1
    core.data_to_send(a)
    facts.saw_status("postcopy-paused")
    answered(a, {"execute": "migrate", "arguments": {"uri": "tcp:h:2", "resume": True}})
    # While QEMU runs the resume, a change (a delete: QEMU takes no blocker while
    # paused) waits for its commit, and with it every reply answered meanwhile.
    answered(b, {"execute": "del-blocker", "arguments": {"id": "x"}})
    (_, call), = core.take_calls()
    assert call.name == "migrate"
    core.resume(a, {})
    assert core.data_to_send(a) == b""  # held
    assert scrape(core).value("migblockd_migrations_started_total") == 1
    commit()
    assert [m for m in lines(core.data_to_send(a)) if "event" not in m] == [{"return": {}}]
    assert scrape(core).value("migblockd_migrations_started_total") == 1
    assert core.stats.commands["migrate"].ok == 2


def call(app: MetricsApp, method: str = "GET") -> tuple[str, bytes]:
    """One WSGI request to ``app``: its status line and body."""
    statuses: list[str] = []
    body = b"".join(app({"REQUEST_METHOD": method, "QUERY_STRING": ""},
                        lambda status, headers: statuses.append(status)))
    return statuses[0], body


@contextlib.contextmanager
def app_on_a_running_loop() -> Iterator[tuple[MetricsApp, asyncio.AbstractEventLoop]]:
    """A fresh core's metrics app, and its event loop, running on a thread until the
    block ends (then stopped, not closed: a wedged loop, for what follows)."""
    core, _ = make()
    loop = asyncio.new_event_loop()
    ran = threading.Thread(target=loop.run_forever)
    ran.start()
    try:
        yield MetricsApp(metrics_registry(core), loop), loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        ran.join()


def test_the_answer_is_built_on_the_event_loop_or_not_at_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with app_on_a_running_loop() as (app, loop):
        status, body = call(app)
        assert status == "200 OK" and b"migblockd_clients 0.0" in body
        assert call(app, "POST")[0] == "405 Method Not Allowed"
    # A loop that does not run (wedged): the scraper hears so, after a while.
    monkeypatch.setattr(exposition, "RENDER_TIMEOUT", 0.05)
    assert call(app) == ("503 Service Unavailable",
                         b"migblockd's event loop did not answer in time\n")
    loop.close()
    assert call(app) == ("503 Service Unavailable", b"migblockd is stopping\n")


def answer(app: MetricsApp, method: str) -> tuple[str, dict[str, str], bytes]:
    """One WSGI request to ``app``: its status line, headers and body."""
    got: list[tuple[str, list[tuple[str, str]]]] = []
    body = b"".join(app({"REQUEST_METHOD": method, "QUERY_STRING": "",
                         "HTTP_ACCEPT_ENCODING": "gzip"},
                        lambda status, headers: got.append((status, headers))))
    return got[0][0], dict(got[0][1]), body


def test_head_answers_with_the_gets_status(monkeypatch: pytest.MonkeyPatch) -> None:
    # An uptime probe's HEAD said 200 whatever the loop did: a wedged or stopping
    # daemon looked healthy to it.
    with app_on_a_running_loop() as (app, loop):
        status, headers, body = answer(app, "HEAD")
        assert (status, headers.get("Content-Encoding"), body) == ("200 OK", "gzip", b"")
        assert "Content-Length" not in headers  # not built: not known
    monkeypatch.setattr(exposition, "RENDER_TIMEOUT", 0.05)
    for why in (b"migblockd's event loop did not answer in time\n", b"migblockd is stopping\n"):
        get = answer(app, "GET")
        assert get[0] == "503 Service Unavailable" and get[2] == why
        status, headers, body = answer(app, "HEAD")
        # The GET's status and headers, its length included; no body.
        assert (status, body) == (get[0], b"")
        assert headers == {**get[1], "Content-Length": str(len(why))}
        loop.close()  # the daemon stopping, for the second round


def test_a_qemu_is_unresponsive_only_while_connected() -> None:
    # The link knows a forwarded command timed out; a QEMU that is gone is
    # disconnected, not unresponsive, until its next connection says otherwise.
    facts = QemuFacts(Path("/run/qemu.sock"))
    facts.timed_out = lambda: True
    assert not facts.silent
    facts.connected = True
    assert facts.silent
    facts.timed_out = lambda: False
    assert not facts.silent


def test_a_scrape_shows_no_change_before_its_commit() -> None:
    # Found by review: with durable state a blocker is acknowledged only once
    # its add is committed (the reply waits for it, a failed commit undoes it),
    # and migblockd_blockers_added_total counted it then; but the gauges read
    # the registry, where it is at once.  A scrape during the commit showed a
    # blocker no client had been told of, that a crash or a full disk took back.
    core, clock = make(durable=True)
    a = connect(core, ADMIN)

    def send(request: dict[str, Any]) -> None:
        core.receive_data(a, json.dumps(request).encode())
        core.execute(a, 32)

    def commit(ok: bool = True) -> None:
        group = core.take_group(wait=False)
        assert group is not None
        if ok:
            core.committed(group)
        else:
            core.commit_failed(group, "No space left on device")
        core.data_to_send(a)

    def shown() -> tuple[float, float | None, float, float]:
        metrics = scrape(core).plain()
        return (metrics[key("migblockd_blockers", source="migblockd", mode="normal")],
                metrics.get(key("migblockd_blocked_since_seconds")),
                metrics[key("migblockd_migration_mode", mode="normal")],
                metrics[key("migblockd_blockers_added_total")])

    send(add("kept", id="kept"))
    assert shown() == (0, None, 1, 0)  # its commit is under way
    commit()
    kept = core.registry.get("kept")
    assert kept is not None
    assert shown() == (1, kept.added, 1, 1)
    clock.advance(1.0)
    send(add("new", id="new"))
    assert shown() == (1, kept.added, 1, 1)
    commit(ok=False)  # a full disk: never added
    assert shown() == (1, kept.added, 1, 1)
    send(add("new", id="new"))
    commit()
    new = core.registry.get("new")
    assert new is not None
    send({"execute": "del-blocker", "arguments": {"id": "kept"}})
    assert shown() == (2, kept.added, 1, 2)  # the delete may yet be taken back
    commit()
    assert shown() == (1, new.added, 1, 2)
    send({"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-reboot"}})
    assert shown() == (1, new.added, 1, 2)  # still the mode on disk
    commit()
    assert shown()[2] == 0
