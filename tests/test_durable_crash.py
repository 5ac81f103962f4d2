"""Random crashes of the real daemon lose nothing that was acknowledged.

The soak (benchmarks/crash_soak.py) kills the daemon (SIGKILL, sometimes
SIGABRT as systemd's watchdog does, sometimes while it starts; every tenth
round it stops it with SIGTERM instead) at random moments while four clients
add and delete blockers, restarts it on the same state directory, and checks
the restored blockers and mode against what the clients were told
(benchmarks/crashmodel.py).  The model's own rules are tested here too, and a
daemon that forgets (``--ephemeral``) must be caught.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import ROOT

from benchmarks.crash_soak import Client, Daemon, soak
from benchmarks.crashmodel import Ledger

MODES = ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
#: Kills under the clients' load (each round ends in one, every tenth a clean
#: stop); kills of a starting daemon come on top.
ROUNDS = 60


def summary(report: Any) -> str:
    return (f"seed {report.seed}, {report.kills} kills ({report.rounds} under load, "
            f"{report.by_signal}) in {report.seconds:.1f} s, {report.counts}; rounds by the "
            f"changes unanswered at the kill: {dict(sorted(report.unanswered_per_round.items()))}"
            f", {report.rounds_cut_mid_change} cut between a change and its reply; "
            f"logs in {report.logs}; violations:\n"
            + "\n".join(report.violations[:20]))


async def test_random_kills_lose_nothing_acknowledged(short_tmp: Path) -> None:
    report = await soak(short_tmp, rounds=ROUNDS)
    assert report.violations == [], summary(report)
    assert report.rounds >= ROUNDS, summary(report)  # the daemon restarted every time
    assert report.by_signal.get("SIGKILL", 0) > 0
    assert report.by_signal.get("SIGTERM", 0) == ROUNDS // 10, summary(report)
    # The rounds did work: acknowledged adds and deletes, checked after restarts,
    # and changes left unanswered by a clean stop, checked not to have been made.
    for what in ("acknowledged add kept", "acknowledged delete kept", "mode acknowledged",
                 "unanswered not done at stop"):
        assert report.counts.get(what, 0) > 0, summary(report)
    # Each round checked what it left unanswered, never nothing.
    assert sum(report.unanswered_per_round.values()) == report.rounds, summary(report)
    assert 0 not in report.unanswered_per_round, summary(report)
    print(f"crash soak: {summary(report)}")


async def test_the_soak_catches_a_daemon_that_forgets(short_tmp: Path) -> None:
    """Without its state directory the daemon loses blockers and reuses ids: the
    soak must say so."""
    report = await soak(short_tmp, kills=4, daemon_args=["--ephemeral"], delay=(0.15, 0.25))
    assert any(v.endswith("is gone") for v in report.violations), summary(report)
    assert any(v.endswith("handed out again") for v in report.violations), summary(report)
    assert report.logs == str(short_tmp)


async def test_every_kill_finds_changes_in_flight(short_tmp: Path) -> None:
    """The delay before a round's kill counts from when its clients have negotiated:
    a kill that came before they sent anything would test nothing of this round."""
    report = await soak(short_tmp, rounds=3, delay=(0.0, 0.0))
    assert report.violations == [], summary(report)
    assert 0 not in report.unanswered_per_round, summary(report)


async def test_the_soak_keeps_the_logs_of_a_round_whose_clients_saw_a_violation(
        short_tmp: Path) -> None:
    """A refused add is seen by its client during the round, not by the check after
    the restart: the round's daemon log must be kept all the same."""
    report = await soak(short_tmp, rounds=1, daemon_args=["--max-blockers", "1"])
    assert any(" failed: " in v for v in report.violations), summary(report)
    # The daemon that refused, and the one that restarted after it.
    logs = sorted(short_tmp.glob("daemon-*.log"))
    assert len(logs) >= 2, logs
    assert any("added blocker" in log.read_text() for log in logs), \
        [log.read_text()[-500:] for log in logs]


def test_the_soak_runs_from_the_command_line(short_tmp: Path) -> None:
    out = short_tmp / "report.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.crash_soak", "--rounds", "3", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no violations" in proc.stdout
    assert " kills/s" in proc.stdout
    report = json.loads(out.read_text())
    assert report["rounds"] == 3 and report["kills"] >= 3
    assert report["violations"] == []
    assert report["kills_per_second"] > 0


async def test_the_soak_waits_for_a_stopping_daemon_without_blocking(short_tmp: Path) -> None:
    """A daemon stopped by SIGTERM answers its clients before it exits: the soak's
    clients must go on reading while the soak waits for that exit."""
    daemon = Daemon(short_tmp / "d.sock", short_tmp / "state", short_tmp / "d.log", [])
    try:
        assert await daemon.ready() is None
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(count_turns())
        await asyncio.sleep(0)
        before = turns
        assert await daemon.kill(signal.SIGTERM) is None, daemon.log_tail()
        during = turns - before
        ticker.cancel()
        assert during > 0, "the event loop stood still while the daemon stopped"
        assert "received SIGTERM" in daemon.log_tail()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


async def test_the_soak_reports_a_daemon_that_exits_otherwise(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp / "d.sock", short_tmp / "state", short_tmp / "d.log", [])
    try:
        assert await daemon.ready() is None
        # Killed when it should have stopped cleanly: not the exit SIGTERM makes.
        daemon.proc.kill()
        daemon.proc.wait()
        assert await daemon.kill(signal.SIGTERM) == "the daemon had exited with -9 before " \
            "its SIGTERM"
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


async def answer_two_then_die(listener: socket.socket,
                              answered: list[dict[str, Any]]) -> None:
    """Greet, negotiate, then answer the first two requests in one write and close
    with the rest unanswered: what the client sees of a daemon killed just then."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    with conn:
        buffer = b""

        async def request() -> dict[str, Any]:
            nonlocal buffer
            while b"\n" not in buffer:
                buffer += await loop.sock_recv(conn, 1 << 16)
            line, buffer = buffer.split(b"\n", 1)
            return dict(json.loads(line))

        await loop.sock_sendall(conn, b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        await request()
        await loop.sock_sendall(conn, b'{"return": {}}\r\n')
        replies = b""
        for n in range(2):
            req = await request()
            args = req.get("arguments", {})
            adding = req["execute"] == "add-blocker"
            result = {"id": args.get("id", f"#blocker{n}")} if adding else {}
            replies += json.dumps({"return": result, "id": req["id"]}).encode() + b"\r\n"
            answered.append(req)
        # The write and the close in one step (no await between): the client's next
        # requests find the peer gone, with both replies still unread.
        assert conn.send(replies) == len(replies)


async def test_replies_read_after_the_daemon_died_are_recorded(short_tmp: Path) -> None:
    """A reply that arrived is an acknowledgement, even when sending the next
    request fails because the daemon is gone; otherwise a lost acknowledged add
    would pass for an unanswered one."""
    path = short_tmp / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.setblocking(False)
    answered: list[dict[str, Any]] = []
    ledger = Ledger(MODES)
    client = Client(1, ledger, random.Random(1), 0, window=4)
    with listener:
        server = asyncio.create_task(answer_two_then_die(listener, answered))
        await asyncio.wait_for(client.run(path), 10)
        await server
    assert [req["execute"] for req in answered] == ["add-blocker", "add-blocker"]
    assert ledger.counts["add acknowledged"] == 2
    assert not {req["id"] for req in answered} & set(client.inflight)
    # The second reply came after the send that failed: nothing was sent after it,
    # so the add it acknowledged must still be there after the "restart".
    last = ledger.adds[answered[1]["arguments"]["reason"]]
    assert last.status == "present" and last.durable  # (so with random.Random(1))
    ledger.check([], "normal", "r0")
    assert f"r0: acknowledged add {last.id} ({last.tag!r}) is gone" in ledger.violations


# -- the model's rules, on made-up observations -----------------------------------------


def info(ledger: Ledger, tag: str, id: str | None = None) -> dict[str, Any]:
    """``query-blockers``' entry for the add ``tag``, as an honest daemon lists it."""
    add = ledger.adds[tag]
    return {"id": id or add.id, "reason": tag, "modes": add.modes, "internal": add.internal,
            "scope": add.scope}


def ack(ledger: Ledger, tag: str, id: str) -> None:
    ledger.acked_add(tag, {"return": {"id": id}})


def two_acknowledged() -> Ledger:
    ledger = Ledger(MODES)
    ledger.sent_add("a", 0, None, None, False, "daemon")
    ledger.sent_add("b", 1, "b", ["cpr-exec", "normal"], True, "daemon")
    ack(ledger, "a", "#blocker0")
    ack(ledger, "b", "b")
    assert ledger.adds["b"].modes == ["normal", "cpr-exec"]  # the schema's order
    return ledger


def test_model_accepts_what_an_honest_daemon_restores() -> None:
    ledger = two_acknowledged()
    ledger.sent_add("c", 0, None, None, False, "daemon")  # unanswered
    ledger.sent_add("d", 1, "d", None, False, "daemon")  # unanswered
    ledger.sent_delete(ledger.adds["a"])  # unanswered
    ledger.sent_add("e", 2, None, None, False, "connection")
    ack(ledger, "e", "#blocker1")
    ledger.sent_mode("cpr-reboot")
    listing = [info(ledger, "a"), info(ledger, "b"), info(ledger, "c", "#blocker1024")]
    assert ledger.check(listing, "cpr-reboot", "r0") == 0, ledger.violations
    # What the daemon held is the new record: "c" is present with its id, "d" is gone.
    assert set(ledger.adds) == {"a", "b", "c"}
    assert ledger.adds["c"].id == "#blocker1024"
    assert ledger.generated == {"#blocker0", "#blocker1", "#blocker1024"}
    assert ledger.check(listing, "cpr-reboot", "r1") == 0


def test_model_catches_a_lost_add_and_an_undone_delete() -> None:
    ledger = two_acknowledged()
    ledger.sent_delete(ledger.adds["b"])
    ledger.acked_delete(ledger.adds["b"], {"return": {}})
    assert ledger.check([info(ledger, "b")], "normal", "r0") == 2
    assert ledger.violations == [
        "r0: acknowledged add #blocker0 ('a') is gone",
        "r0: b ('b'): its delete was acknowledged, yet it is back",
    ]


def test_model_catches_strangers_and_connection_scoped_blockers() -> None:
    ledger = two_acknowledged()
    ledger.sent_add("held", 0, "held", None, False, "connection")
    ack(ledger, "held", "held")
    stranger = {"id": "x", "reason": "nobody sent this", "modes": MODES, "internal": False,
                "scope": "daemon"}
    listing = [info(ledger, "a"), info(ledger, "b"), info(ledger, "held"), stranger]
    assert ledger.check(listing, "normal", "r0") == 2
    assert ledger.violations[0] == f"r0: a blocker nobody added: {stranger}"
    assert ledger.violations[1] == "r0: held ('held'): connection-scoped, yet restored"


def test_model_catches_changed_fields() -> None:
    ledger = two_acknowledged()
    wrong = dict(info(ledger, "b"), modes=MODES, internal=False)
    assert ledger.check([info(ledger, "a", "#blocker7"), wrong], "normal", "r0") == 2
    assert ledger.violations[0] == "r0: #blocker7 ('a'): the id should be #blocker0"
    assert ledger.violations[1].startswith("r0: b ('b'): {'modes': ")


def test_model_catches_reused_generated_ids() -> None:
    ledger = two_acknowledged()
    ledger.sent_add("again", 0, None, None, False, "daemon")
    ack(ledger, "again", "#blocker0")
    ledger.sent_add("unanswered", 0, None, None, False, "daemon")
    listing = [info(ledger, "a"), info(ledger, "b"), info(ledger, "unanswered", "#blocker0")]
    ledger.check(listing, "normal", "r0")
    assert ledger.violations == [
        "add 'again': generated id #blocker0 handed out again",
        "r0: acknowledged add #blocker0 ('again') is gone",
        "r0: #blocker0 ('unanswered'): generated id handed out twice",
    ]


def test_model_catches_a_changed_order() -> None:
    def checked_then_two_more() -> Ledger:
        ledger = two_acknowledged()
        assert ledger.check([info(ledger, "a"), info(ledger, "b")], "normal", "r0") == 0
        for tag in ("new0", "new1"):
            ledger.sent_add(tag, 0, tag, None, False, "daemon")
            ack(ledger, tag, tag)
        return ledger

    assert checked_then_two_more().check(
        [info(ledger, tag) for ledger in [checked_then_two_more()]
         for tag in ("a", "b", "new0", "new1")], "normal", "r1") == 0
    # Survivors swapped; a new one before a survivor; one client's out of order.
    cases: list[tuple[list[str], str]] = [
        (["b", "a", "new0", "new1"], "restored blockers out of order"),
        (["a", "new0", "b", "new1"], "restored blockers out of order"),
        (["a", "b", "new1", "new0"], "client 0's blockers out of order"),
    ]
    for order, expected in cases:
        ledger = checked_then_two_more()
        ledger.check([info(ledger, tag) for tag in order], "normal", "r1")
        assert len(ledger.violations) == 1, ledger.violations
        assert expected in ledger.violations[0]


def test_model_after_a_clean_stop_nothing_unanswered_was_made() -> None:
    """SIGTERM answers every request the daemon read before it exits: what stayed
    unanswered was never read, so never made.  After a kill it may have been."""

    def unanswered_changes() -> Ledger:
        ledger = two_acknowledged()
        ledger.sent_add("c", 0, None, None, False, "daemon")
        ledger.sent_add("d", 1, "d", None, False, "daemon")
        ledger.sent_delete(ledger.adds["a"])
        ledger.sent_mode("cpr-exec")
        return ledger

    def made(ledger: Ledger) -> tuple[list[dict[str, Any]], str]:
        return [info(ledger, "b"), info(ledger, "c", "#blocker5"), info(ledger, "d")], "cpr-exec"

    def not_made(ledger: Ledger) -> tuple[list[dict[str, Any]], str]:
        return [info(ledger, "a"), info(ledger, "b")], "normal"

    for clean in (False, True):
        ledger = unanswered_changes()
        assert ledger.check(*not_made(ledger), "r0", clean=clean) == 0, ledger.violations
    ledger = unanswered_changes()
    assert ledger.check(*made(ledger), "r0") == 0, ledger.violations
    assert ledger.unanswered_done == 3
    ledger = unanswered_changes()
    assert ledger.check(*made(ledger), "r0", clean=True) == 4
    assert ledger.violations == [
        "r0: #blocker0 ('a'): deleted before a clean stop, yet never answered",
        "r0: #blocker5 ('c'): added before a clean stop, yet never answered",
        "r0: d ('d'): added before a clean stop, yet never answered",
        "r0: mode cpr-exec, not normal (acknowledged), after a clean stop",
    ]


def test_model_checks_the_mode() -> None:
    ledger = two_acknowledged()
    ledger.sent_mode("cpr-exec")
    ledger.acked_mode({"return": {}})
    ledger.sent_mode("cpr-reboot")
    listing = [info(ledger, "a"), info(ledger, "b")]
    assert ledger.check(listing, "cpr-exec", "r0") == 0  # the unanswered one did not happen
    assert ledger.check(listing, "normal", "r1") == 1
    assert ledger.violations == ["r1: mode normal, not cpr-exec (acknowledged) nor any of [] "
                                 "(unanswered)"]
