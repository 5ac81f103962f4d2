"""Crash soak: kill the real daemon at random moments while clients change blockers.

Run from the repository root::

    .venv/bin/python -m benchmarks.crash_soak --minutes 10    # a long soak
    .venv/bin/python -m benchmarks.crash_soak --rounds 50     # what the test suite runs

Each round, ``--clients`` connections add blockers (generated ids and their
own, daemon- and connection-scoped, some internal, various modes), delete
their own, run ``query-blockers`` and (the first client) change the mode, with
up to four requests in flight each.  After a random delay, counted from when
every client has negotiated (so that every kill finds changes in flight), the daemon gets
SIGKILL (or, one time in five, SIGABRT, which is what systemd's watchdog
sends); every tenth round ends instead in SIGTERM, a clean stop, after which
the first commit begins SQLite's log anew, a moment the kills would otherwise
never reach.  The soak waits for the daemon's exit on a thread, so its clients
go on reading meanwhile, as a stopping daemon expects of them; the exit must be
the signal's (0 for SIGTERM).  Sometimes the restarted daemon is killed again
while it starts.  The daemon is then started on the same state directory and
must say it is ready; its blockers and mode are checked against what the
clients were told (:mod:`benchmarks.crashmodel`): every reply that reached a
client, those it reads after the kill included; after a clean stop, also that
no change left unanswered was made (the daemon answers every request it read).
The report gives the kills, kills/s, what happened to the changes in flight,
how many were in flight at each kill, and every violation; the exit status is
1 if there was any.  Daemon logs of a round with a violation are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.crashmodel import Add, Ledger

MODES = ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
READY = b" ready on "
#: How long a daemon may take to say it is ready (a loaded 2-core machine).
START_TIMEOUT = 30.0
IO_TIMEOUT = 10.0
#: The longest a round's clients run before the kill.
MAX_DELAY = 0.25
#: One round in this many ends in a clean stop (SIGTERM) instead of a kill.
CLEAN_EVERY = 10


class Daemon:
    """One ``python -m migblockd`` on the soak's socket and state directory."""

    def __init__(self, socket: Path, state_dir: Path, log_path: Path,
                 args: Sequence[str]) -> None:
        argv = [sys.executable, "-m", "migblockd", "--socket", str(socket), "--state-dir",
                str(state_dir), "--log-level", "info", *args]
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    async def ready(self) -> str | None:
        """None once the daemon logs that it is ready; else why it did not."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            exited = self.proc.poll()
            if READY in self.log_path.read_bytes():
                return None
            if exited is not None:
                return f"the daemon exited with {exited} instead of starting"
            if time.monotonic() > deadline:
                return f"the daemon was not ready within {START_TIMEOUT} s"
            await asyncio.sleep(0.01)

    async def kill(self, sig: int) -> str | None:
        """Signal the daemon and wait for its exit, on a thread: the event loop,
        and so the clients, keep running meanwhile (a stopping daemon waits for
        them to take their last replies).  None if it exited as ``sig`` makes it
        (0 for SIGTERM, a clean stop); else what it did instead."""
        running = self.proc.poll() is None
        if running:
            self.proc.send_signal(sig)
        status = await asyncio.to_thread(self.proc.wait)
        expected = 0 if sig == signal.SIGTERM else -sig
        if running and status == expected:
            return None
        if not running:
            return f"the daemon had exited with {status} before its {signal.Signals(sig).name}"
        return f"the daemon exited with {status} after {signal.Signals(sig).name}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass
class Report:
    seed: int = 0
    kills: int = 0
    by_signal: dict[str, int] = field(default_factory=dict)
    kills_while_starting: int = 0
    rounds: int = 0
    #: Rounds by how many changes (adds, deletes, modes) were left unanswered at
    #: the kill: the ones whose fate the restart decides.
    unanswered_per_round: dict[int, int] = field(default_factory=dict)
    #: Rounds whose kill came after a change was applied but before its reply
    #: was read: the moment a kill must not turn into a loss.
    rounds_cut_mid_change: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    highest_generated_id: int = -1
    violations: list[str] = field(default_factory=list)
    logs: str | None = None  # where the logs of the rounds with violations are

    @property
    def kills_per_second(self) -> float:
        return self.kills / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "kills_per_second": round(self.kills_per_second, 2)}


class Client:
    """One connection's turn in a round: random changes, each recorded in the ledger."""

    def __init__(self, number: int, ledger: Ledger, rng: random.Random, round_no: int,
                 window: int | None = None) -> None:
        self.number = number
        self.window = window  # requests in flight; None: a random 1 to 4
        self.ledger = ledger
        self.rng = rng
        self.round = round_no
        self.sent = 0
        self.inflight: dict[int, tuple[str, Add | None]] = {}
        #: Set once the connection is negotiated (or has failed): the round's
        #: delay before the kill counts from then.
        self.negotiated = asyncio.Event()

    def next_request(self) -> dict[str, Any]:
        rng, ledger = self.rng, self.ledger
        self.sent += 1
        n = self.sent
        if self.number == 0 and rng.random() < 0.08:
            mode = rng.choice(MODES)
            ledger.sent_mode(mode)
            self.inflight[n] = ("mode", None)
            return {"execute": "migrate-set-parameters", "arguments": {"mode": mode}, "id": n}
        deletable = ledger.deletable(self.number)
        r = rng.random()
        if deletable and r < (0.7 if len(deletable) > 12 else 0.35):
            add = rng.choice(deletable)
            ledger.sent_delete(add)
            self.inflight[n] = ("delete", add)
            return {"execute": "del-blocker", "arguments": {"id": add.id}, "id": n}
        if r > 0.95:
            self.inflight[n] = ("query", None)
            return {"execute": "query-blockers", "id": n}
        tag = f"crash {self.round}.{self.number}.{n} ✓"
        args: dict[str, Any] = {"reason": tag}
        if rng.random() < 0.5:
            args["id"] = f"c{self.round}-{self.number}-{n}"
        if rng.random() < 0.1:
            args["scope"] = "connection"
        if rng.random() < 0.6:
            args["modes"] = rng.sample(MODES, rng.randint(1, len(MODES)))
        if rng.random() < 0.2:
            args["internal"] = True
        add = ledger.sent_add(tag, self.number, args.get("id"), args.get("modes"),
                              args.get("internal", False), args.get("scope", "daemon"))
        self.inflight[n] = ("add", add)
        return {"execute": "add-blocker", "arguments": args, "id": n}

    def answered(self, reply: dict[str, Any]) -> None:
        kind, add = self.inflight.pop(reply["id"])
        if kind == "add":
            assert add is not None
            self.ledger.acked_add(add.tag, reply)
        elif kind == "delete":
            assert add is not None
            self.ledger.acked_delete(add, reply)
        elif kind == "mode":
            self.ledger.acked_mode(reply)
        elif "return" not in reply:
            self.ledger.violations.append(f"query-blockers failed: {reply}")

    async def run(self, path: Path) -> None:
        """Until the daemon dies: whatever is in flight then stays unanswered.

        Every complete reply that arrived is recorded, also after a send failed:
        a killed daemon's last replies can still be in the receive buffer, and
        the changes they acknowledge must then be found after the restart.  A
        failed send only stops the sending; reading goes on until the end of
        the stream (or the reset that follows the buffered data)."""
        loop = asyncio.get_running_loop()
        # A plain socket, not asyncio streams: a stream's transport stops reading
        # once a write fails, and its reader raises the error even when complete
        # lines are buffered.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        lines = Lines(loop, sock)
        try:
            try:
                await loop.sock_connect(sock, str(path))
            except OSError:
                return
            if await lines.next() is None:  # the greeting
                return
            sending = await lines.send(b'{"execute": "qmp_capabilities"}\n')
            if await lines.next() is None:
                return
            self.negotiated.set()  # its first requests go out before the next turn
            window = self.window or self.rng.randint(1, 4)
            while True:
                if sending:
                    batch = []
                    while len(self.inflight) < window:
                        batch.append(json.dumps(self.next_request()).encode() + b"\n")
                    if batch:
                        sending = await lines.send(b"".join(batch))
                line = await lines.next()
                if line is None:
                    return  # the daemon is gone
                message = json.loads(line)
                if "event" in message:
                    continue
                if message.get("id") not in self.inflight:
                    self.ledger.violations.append(f"a reply to no request: {message}")
                    return
                self.answered(message)
        finally:
            sock.close()


class Lines:
    """A socket's complete lines, and sends that report failure instead of raising."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.buffer = bytearray()

    async def next(self) -> bytes | None:
        """The next complete line; None at the end of the stream or a reset (a
        partial line left then acknowledges nothing)."""
        while (end := self.buffer.find(b"\n")) < 0:
            try:
                data = await self.loop.sock_recv(self.sock, 1 << 16)
            except OSError:
                return None
            if not data:
                return None
            self.buffer += data
        line = bytes(self.buffer[:end + 1])
        del self.buffer[:end + 1]
        return line

    async def send(self, data: bytes) -> bool:
        """False if the peer is gone (the requests count as sent: some may have
        reached it)."""
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError:
            return False
        return True


async def observe(socket: Path) -> tuple[list[dict[str, Any]], str]:
    """The blockers and the mode of a freshly started daemon."""
    reader, writer = await asyncio.open_unix_connection(str(socket), limit=1 << 24)
    try:
        await reader.readline()
        replies = []
        for request in (b'{"execute": "qmp_capabilities"}', b'{"execute": "query-blockers"}',
                        b'{"execute": "query-migrate-parameters"}'):
            writer.write(request + b"\n")
            replies.append(json.loads(await reader.readline())["return"])
        return replies[1], replies[2]["mode"]
    finally:
        writer.close()


class Soak:
    def __init__(self, workdir: Path, *, clients: int, seed: int,
                 daemon_args: Sequence[str], delay: tuple[float, float]) -> None:
        self.workdir = workdir
        self.socket = workdir / "migblockd.sock"
        self.state_dir = workdir / "state"
        self.clients = clients
        self.rng = random.Random(seed)
        self.seed = seed
        self.daemon_args = list(daemon_args)
        self.delay = delay
        self.ledger = Ledger(MODES)
        self.report = Report()
        self.spawned = 0
        self.round_logs: list[Path] = []
        self.daemon: Daemon | None = None

    def spawn(self) -> Daemon:
        self.spawned += 1
        log_path = self.workdir / f"daemon-{self.spawned}.log"
        self.round_logs.append(log_path)
        self.daemon = Daemon(self.socket, self.state_dir, log_path, self.daemon_args)
        return self.daemon

    async def kill(self, daemon: Daemon, sig: int, where: str) -> None:
        why = await daemon.kill(sig)
        if why is not None:
            self.ledger.violations.append(f"{where}: {why}; its log:\n{daemon.log_tail()}")
        self.report.kills += 1
        name = signal.Signals(sig).name
        self.report.by_signal[name] = self.report.by_signal.get(name, 0) + 1

    async def start(self) -> bool:
        """A daemon on the state directory; now and then killed while it starts
        (during the restore, or creating the database), and started again."""
        daemon = self.spawn()
        if self.rng.random() < 0.15:
            await asyncio.sleep(self.rng.uniform(0.0, 0.6))
            await self.kill(daemon, signal.SIGKILL, f"round {self.report.rounds}, starting")
            self.report.kills_while_starting += 1
            daemon = self.spawn()
        why = await daemon.ready()
        if why is not None:
            self.ledger.violations.append(
                f"round {self.report.rounds}: {why}; its log:\n{daemon.log_tail()}")
            return False
        return True

    def ending(self, number: int) -> signal.Signals:
        """The end of round ``number``'s daemon: mostly a kill (SIGABRT one time in
        five); every tenth round (the second, the twelfth...) a clean stop, which
        removes the log, so that the next round's kill comes while the first
        commit after a stop begins it anew."""
        if number % CLEAN_EVERY == 1:
            return signal.SIGTERM
        return signal.SIGABRT if self.rng.random() < 0.2 else signal.SIGKILL

    async def round(self) -> bool:
        """Clients, a kill, a restart and the check; False if the soak must stop."""
        daemon = self.daemon
        assert daemon is not None
        number = self.report.rounds
        found = len(self.ledger.violations)
        clients = [Client(k, self.ledger, self.rng, number) for k in range(self.clients)]
        tasks = [asyncio.create_task(c.run(self.socket)) for c in clients]
        # From when every client has its requests in flight: a kill before that
        # would find little or nothing to lose.
        ready = [asyncio.create_task(c.negotiated.wait()) for c in clients]
        for task, wait in zip(tasks, ready, strict=True):
            await asyncio.wait([task, wait], timeout=IO_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
            wait.cancel()
        await asyncio.sleep(self.rng.uniform(*self.delay))
        ending = self.ending(number)
        where = f"round {number}"
        await self.kill(daemon, ending, where)
        await asyncio.wait_for(asyncio.gather(*tasks), IO_TIMEOUT)
        clean = ending == signal.SIGTERM
        if clean:
            # The soak's clients take their replies as they come: a stopping daemon
            # has no reason to drop one, and one dropped loses its replies (while its
            # requests still run), which would pass for a clean stop's fault.
            dropped = [line for line in daemon.log_path.read_text(errors="replace").splitlines()
                       if ": dropped: " in line]
            if dropped:
                self.ledger.violations.append(f"{where}: SIGTERM dropped a client that "
                                              f"was reading: {dropped}")
        unanswered = sum(1 for c in clients for kind, _ in c.inflight.values()
                         if kind != "query")
        hist = self.report.unanswered_per_round
        hist[unanswered] = hist.get(unanswered, 0) + 1
        self.report.rounds += 1
        if not await self.start():
            return False
        listing, mode = await asyncio.wait_for(observe(self.socket), IO_TIMEOUT)
        assert self.daemon is not None
        current = self.daemon.log_path
        done_before = self.ledger.unanswered_done
        self.ledger.check(listing, mode, where, clean=clean)
        if self.ledger.unanswered_done > done_before:
            self.report.rounds_cut_mid_change += 1
        if len(self.ledger.violations) == found:  # also none the clients saw
            for log in self.round_logs:  # keep only the logs of rounds with violations
                if log != current:
                    log.unlink()
        self.round_logs = [current]
        return True

    async def run(self, kills: int | None, rounds: int | None,
                  seconds: float | None) -> Report:
        begin = time.monotonic()
        # A SIGABRT would dump core, and the soak kills thousands of daemons:
        # they inherit a zero core size from here.
        cores = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, cores[1]))
        try:
            ok = await self.start()
            while ok and not (kills is not None and self.report.kills >= kills) and not (
                    rounds is not None and self.report.rounds >= rounds) and not (
                    seconds is not None and time.monotonic() - begin >= seconds):
                ok = await self.round()
        finally:
            if self.daemon is not None:
                await self.daemon.kill(signal.SIGKILL)
            resource.setrlimit(resource.RLIMIT_CORE, cores)
        report = self.report
        report.seed = self.seed
        report.seconds = time.monotonic() - begin
        report.counts = dict(sorted(self.ledger.counts.items()))
        report.violations = self.ledger.violations
        numbers = [int(id.removeprefix("#blocker")) for id in self.ledger.generated]
        report.highest_generated_id = max(numbers, default=-1)
        return report


async def soak(workdir: Path, *, kills: int | None = None, rounds: int | None = None,
               seconds: float | None = None, clients: int = 4, seed: int | None = None,
               daemon_args: Sequence[str] = (),
               delay: tuple[float, float] = (0.0, MAX_DELAY)) -> Report:
    """Run the soak in ``workdir`` (a short path: the socket lives there) until
    ``kills`` kills (those of a starting daemon included), ``rounds`` rounds (each
    ends in one kill under the clients' load) or ``seconds`` seconds, whichever
    comes first.  Each round's clients run for a random time within ``delay``
    (seconds) before the kill."""
    if seed is None:
        seed = random.randrange(1 << 32)
    runner = Soak(workdir, clients=clients, seed=seed, daemon_args=daemon_args, delay=delay)
    report = await runner.run(kills, rounds, seconds)
    if report.violations:
        report.logs = str(workdir)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crash_soak",
                                     description=__doc__.split("\n\n")[0])
    until = parser.add_mutually_exclusive_group()
    until.add_argument("--minutes", type=float, help="run this long (default: 1)")
    until.add_argument("--kills", type=int,
                       help="stop after this many kills, of starting daemons included")
    until.add_argument("--rounds", type=int,
                       help="stop after this many rounds: kills under the clients' load")
    parser.add_argument("--clients", type=int, default=4, help="client connections (4)")
    parser.add_argument("--seed", type=int, help="random seed (default: a random one)")
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="an extra daemon argument (repeatable)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save the report here")
    args = parser.parse_args(argv)
    counted = args.kills is not None or args.rounds is not None
    seconds = None if counted else 60 * (args.minutes or 1.0)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    workdir = Path(tempfile.mkdtemp(prefix="crash-soak-", dir="/tmp"))
    print(f"crash soak: seed {seed}, {args.clients} clients, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} cores, in {workdir}", flush=True)
    report = asyncio.run(soak(workdir, kills=args.kills, rounds=args.rounds, seconds=seconds,
                              clients=args.clients, seed=seed, daemon_args=args.daemon_arg))
    print(f"{report.kills} kills ({', '.join(f'{n} {s}' for s, n in report.by_signal.items())}; "
          f"{report.kills_while_starting} while starting) in {report.rounds} rounds, "
          f"{report.seconds:.1f} s: {report.kills_per_second:.2f} kills/s")
    print("changes, as each restart found them (a blocker counts at every restart):")
    for what, n in report.counts.items():
        print(f"  {what:28} {n:>9}")
    print(f"  {'highest generated id':28} {report.highest_generated_id:>9}")
    print("rounds by the changes left unanswered at the kill: " + ", ".join(
        f"{n}: {rounds}" for n, rounds in sorted(report.unanswered_per_round.items())))
    print(f"rounds whose kill came between a change and its reply: "
          f"{report.rounds_cut_mid_change}")
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if report.violations:
        print(f"{len(report.violations)} VIOLATION(S); logs in {workdir}:")
        for violation in report.violations:
            print(f"  {violation}")
        return 1
    print("no violations")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
