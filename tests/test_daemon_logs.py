"""The daemon's logs, end to end: a stuck stderr, journald's priorities and fields, JSON.

Each test runs the real daemon with its stderr on a pipe or a file the test
owns; journald is played by the test: ``$JOURNAL_STREAM`` names the file
stderr goes to, and ``$MIGBLOCKD_JOURNAL_SOCKET`` a datagram socket the test
reads.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, assert_clean_log, wait_ready
from journal_entries import Entry, JournalSocket, parse_entry
from qmpclient import qmp_client

from migblockd.startup import EXIT_NOTCONFIGURED

PRIORITY_OF = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3"}


def start(workdir: Path, *args: str, stderr: int | None = None,
          env: dict[str, str] | None = None, journal: bool = False,
          journal_socket: Path | None = None) -> DaemonProcess:
    """The daemon, its stderr on ``stderr`` (a descriptor) or else on a new log file.

    ``journal``: ``$JOURNAL_STREAM`` names that file, i.e. stderr is "the journal".
    ``$MIGBLOCKD_JOURNAL_SOCKET`` is always set (to a path that does not exist
    unless ``journal_socket`` is given), so no test talks to the real journald.
    """
    sock = workdir / "migblockd.sock"
    stamp = time.monotonic_ns()
    log_path = workdir / f"daemon-{stamp}.log"
    # A fresh state directory, as conftest's daemons get: never the user's own.
    argv = [sys.executable, "-m", "migblockd", "--socket", str(sock),
            "--state-dir", str(workdir / f"state-{stamp}"), *args]
    environ = dict(os.environ) if env is None else dict(env)
    if env is None:
        environ.pop("JOURNAL_STREAM", None)  # ours, if pytest runs under systemd
    environ["MIGBLOCKD_JOURNAL_SOCKET"] = str(journal_socket or workdir / "no-journal")
    with log_path.open("wb") as log:
        if journal:
            st = os.fstat(log.fileno())
            environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log if stderr is None else stderr, env=environ)
    return DaemonProcess(sock, proc, log_path, argv)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started: killed afterwards if still running."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_a_start_refused_for_its_settings_says_so_at_error_priority_in_the_journal(
        tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    # Found by review: a bad file stopped the start with a line written before the
    # log was set up, with no priority: journald took it for info, and
    # `journalctl -p err` did not show the most common failure at start.
    bad = tmp_path / "bad.toml"
    bad.write_text("max-clients = -1\n")
    d = start(tmp_path, "--config", str(bad), journal=True)
    daemons.append(d)
    assert d.proc.wait(30) == EXIT_NOTCONFIGURED
    lines = d.log().splitlines()
    assert lines and all(line.startswith("<3>migblockd: ") for line in lines), lines
    assert "max-clients" in lines[0]
    # Not the journal: as before, no mark.
    d = start(tmp_path, "--config", str(bad))
    daemons.append(d)
    assert d.proc.wait(30) == EXIT_NOTCONFIGURED
    assert d.log().startswith("migblockd: ")


@pytest.mark.parametrize("args", [
    ["--socket-mode", "9999"],
    ["--max-clients", "-5", "--ephemeral"],
    # A reload's check (ExecReload=), and argparse's error() called by migblockd itself.
    ["--check-config", "--max-clients", "many"],
    ["--running-pid", "1"],
])
def test_a_bad_option_value_says_so_at_error_priority_in_the_journal(
        tmp_path: Path, daemons: list[DaemonProcess], args: list[str]) -> None:
    # Found by review: argparse wrote its usage and its error unmarked, so journald
    # took them for info, and `journalctl -p err` did not say why a MIGBLOCKD_OPTIONS
    # of a drop-in stopped the start or failed a reload's check.  journald reads a
    # priority per line: the usage's lines are marked too.
    d = start(tmp_path, *args, journal=True)
    daemons.append(d)
    assert d.proc.wait(30) == 2
    lines = d.log().splitlines()
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[0].startswith("<3>usage: migblockd [-h] [--version]"), lines
    assert lines[-1].startswith("<3>migblockd: error: "), lines
    # Not the journal: argparse's words as they were, unmarked.
    d = start(tmp_path, *args)
    daemons.append(d)
    assert d.proc.wait(30) == 2
    assert [f"<3>{line}" for line in d.log().splitlines()] == lines


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_are_no_log_lines(tmp_path: Path, option: str) -> None:
    # On stdout, which under systemd is the journal's stream as stderr is: still
    # unmarked (journald's default priority), since they are no log.
    out = tmp_path / "journal"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with out.open("wb") as stream:
        st = os.fstat(stream.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run([sys.executable, "-m", "migblockd", option],
                              stdin=subprocess.DEVNULL, stdout=stream, stderr=stream,
                              env=env, timeout=30)
    assert proc.returncode == 0
    text = out.read_text()
    assert text.startswith("usage: migblockd " if option == "--help" else "migblockd "), text
    assert "<" not in "".join(line[:1] for line in text.splitlines()), text


# --------------------------------------------------------------------------- a stuck stderr


class Pipe:
    """A pipe for the daemon's stderr that nobody drains, until the test says so."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        # Our own write end, only to ask the kernel whether the pipe has room.
        self._probe: int | None = os.dup(self.write_fd)
        self.size = fcntl.fcntl(self.read_fd, fcntl.F_GETPIPE_SZ)
        self.data = bytearray()
        self._reader: threading.Thread | None = None

    def unread(self) -> int:
        """Bytes written and not read yet (FIONREAD)."""
        buf = fcntl.ioctl(self.read_fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(buf, sys.byteorder)

    def is_full(self) -> bool:
        """The pipe has no room for a write: its writer blocks.  Asked of the
        kernel, which counts buffer pages, not bytes: a pipe of many small
        writes is full with fewer unread bytes than its size."""
        assert self._probe is not None
        _, writable, _ = select.select([], [self._probe], [], 0)
        return not writable

    def _close_probe(self) -> None:
        if self._probe is not None:
            os.close(self._probe)
            self._probe = None

    def drain(self) -> None:
        """From now on, read everything into ``data`` (until the daemon exits)."""
        self._close_probe()  # or the reader would never see the end of the pipe
        def read() -> None:
            while chunk := os.read(self.read_fd, 1 << 16):
                self.data += chunk

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def text(self) -> str:
        return self.data.decode(errors="replace")

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30.0) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while not (found := list(pattern.finditer(self.text()))):
            assert time.monotonic() < deadline, (
                f"{pattern.pattern!r} not in:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        return found

    def close(self) -> None:
        self._close_probe()
        if self._reader is not None:
            self._reader.join(10)
        os.close(self.read_fd)


async def connect_when_listening(d: DaemonProcess) -> None:
    """The ready line cannot be read from a stuck pipe: wait until the socket answers."""
    deadline = time.monotonic() + 20
    while True:
        assert d.proc.poll() is None, f"daemon exited with {d.proc.returncode}"
        try:
            async with qmp_client(d.socket):
                return
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, "the daemon never answered"
            await asyncio.sleep(0.05)


async def cycle(d: DaemonProcess, i: int) -> None:
    """Connect, add a blocker, delete it, close: four info lines in the log."""
    async with qmp_client(d.socket) as c:
        await c.ok("add-blocker", {"reason": "stuck log test", "id": f"stuck{i}"})
        await c.ok("del-blocker", {"id": f"stuck{i}"})


CYCLE_LINE = re.compile(r"INFO: client \d+ \(pid \d+, uid \d+, gid \d+\)"
                        r"(?: connected|: added blocker stuck\d+|: deleted blocker stuck\d+"
                        r"| disconnected)")
LOSS_LINE = re.compile(r"WARNING: dropped (\d+) log record\(s\)")


async def test_an_undrained_stderr_pipe_stops_nothing(tmp_path: Path,
                                                      daemons: list[DaemonProcess]) -> None:
    cycles = 5000
    # (+2: the probe of connect_when_listening connected and disconnected.)
    expected = 4 * cycles + 2

    def accounted(log: str) -> tuple[int, int]:
        lost = sum(int(m.group(1)) for m in LOSS_LINE.finditer(log))
        return len(CYCLE_LINE.findall(log)), lost

    pipe = Pipe()
    try:
        d = start(tmp_path, "--log-level", "info", stderr=pipe.write_fd)
        daemons.append(d)
        os.close(pipe.write_fd)
        await connect_when_listening(d)
        for i in range(cycles):
            await cycle(d, i)
        # The sink really is stuck: the pipe is full and nothing reads it.
        assert pipe.is_full(), (pipe.unread(), pipe.size)
        assert d.proc.poll() is None
        # Once stderr drains, one line says how many records were lost, and
        # every record of the 5,000 cycles was either written or counted.
        pipe.drain()
        pipe.wait_for(LOSS_LINE)
        deadline = time.monotonic() + 30
        while sum(accounted(pipe.text())) != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        pipe.close()
    log = pipe.text()
    written, lost = accounted(log)
    assert lost > 0
    assert written + lost == expected, (written, lost)
    assert log.rstrip().endswith("INFO: stopped"), log[-2000:]
    assert "Traceback" not in log


@pytest.mark.parametrize("again", [None, signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["once", "then-sigterm", "then-sigint", "then-sighup"])
async def test_sigterm_stops_the_daemon_while_stderr_is_stuck(
        tmp_path: Path, daemons: list[DaemonProcess], again: signal.Signals | None) -> None:
    # Reported (again): a second signal while the log's last lines waited for the
    # stuck stderr, the drain over, killed the daemon by its default action.
    pipe = Pipe()
    try:
        d = start(tmp_path, "--log-level", "info", stderr=pipe.write_fd)
        daemons.append(d)
        os.close(pipe.write_fd)
        await connect_when_listening(d)
        # Fill the pipe, then log 800 more lines than it could ever take.
        after_full = 0
        for i in range(5000):
            await cycle(d, i)
            after_full += pipe.is_full()
            if after_full == 200:
                break
        assert after_full == 200, (pipe.unread(), pipe.size)
        # stderr is stuck; the daemon still answers...
        async with qmp_client(d.socket) as c:
            await c.ok("query-blockers")
        # ...and still stops, with nothing read from its stderr.
        d.signal(signal.SIGTERM)
        if again is not None:
            deadline = time.monotonic() + 20
            while d.socket.exists():  # removed as the drain ends: then the last lines
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            d.signal(again)
        assert d.wait_exit() == 0
        assert not d.socket.exists()
    finally:
        pipe.close()


# --------------------------------------------------------------------------- journald


def prefixed(line: str) -> tuple[str, str, str]:
    match = re.fullmatch(r"<(\d)>(DEBUG|INFO|WARNING|ERROR): (.*)", line)
    assert match, f"not a <N>LEVEL: line: {line!r}"
    prio, level, text = match.groups()
    return prio, level, text


def test_journal_stream_lines_carry_their_priority(tmp_path: Path,
                                                   daemons: list[DaemonProcess]) -> None:
    config = tmp_path / "migblockd.toml"
    config.write_text('log-level = "debug"\n')
    d = start(tmp_path, "--config", str(config), "--max-clients", "1", journal=True)
    daemons.append(d)
    wait_ready(d)

    async def clients() -> None:
        async with qmp_client(d.socket) as c:
            await c.ok("query-version")  # debug: the wire; info: connected
            # warning: a second client is refused at max-clients=1
            reader, writer = await asyncio.open_unix_connection(str(d.socket))
            await reader.read()
            writer.close()

    asyncio.run(clients())
    config.write_text("log-level = \n")  # error: the reload fails
    d.signal(signal.SIGHUP)
    d.wait_for_log("reload failed")
    assert d.stop() == 0
    lines = [prefixed(line) for line in d.log().splitlines()]
    for prio, level, _ in lines:
        assert prio == PRIORITY_OF[level]
    seen = {(prio, text.split(":")[0]) for prio, _, text in lines}
    texts = [text for _, _, text in lines]
    assert any(" ready on " in t for t in texts)
    assert {p for p, _ in seen} == {"3", "4", "6", "7"}, seen
    assert any("refused: migblockd is already serving max-clients=1" in t
               for p, _, t in lines if p == "4")
    assert any(t.startswith("reload failed") for p, _, t in lines if p == "3")
    assert any(" <- b'" in t for p, _, t in lines if p == "7")


def test_journal_stream_of_another_process_is_not_ours(tmp_path: Path,
                                                       daemons: list[DaemonProcess]) -> None:
    """``$JOURNAL_STREAM`` inherited by a daemon whose stderr was redirected: a terminal's
    format, with times, and no priority prefixes."""
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    d = start(tmp_path, "--log-level", "info", env=env)
    daemons.append(d)
    wait_ready(d)
    assert d.stop() == 0
    for line in d.log().splitlines():
        assert re.match(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} migblockd\[{d.proc.pid}\] "
                        r"(INFO|WARNING): ", line), line


@pytest.fixture
def journal(short_tmp: Path) -> Iterator[JournalSocket]:
    sock = JournalSocket(short_tmp / "journal.sock")
    yield sock
    sock.close()


def test_a_refused_migration_names_the_blocker_that_refused_it(
        tmp_path: Path, daemons: list[DaemonProcess], journal: JournalSocket) -> None:
    # Two blockers with one reason (two VFIO functions, say): the line names the one
    # that refused, the newest, and the refusal joins that blocker's history.
    d = start(tmp_path, "--log-level", "info", journal=True, journal_socket=journal.path)
    daemons.append(d)
    wait_ready(d)

    async def client() -> None:
        async with qmp_client(d.socket) as c:
            await c.ok("add-blocker", {"reason": "VFIO device", "id": "vf0"})
            await c.ok("add-blocker", {"reason": "VFIO device", "id": "vf1"})
            reply = await c.execute("migrate", {"uri": "tcp:10.0.0.2:4444"})
            assert reply["error"]["desc"] == "VFIO device", reply

    asyncio.run(client())
    refused = journal.wait_for(lambda e: "refused" in e["MESSAGE"])
    assert refused["MESSAGE"].split(": ", 1)[1] == (
        "migrate to 'tcp:10.0.0.2:4444' refused by blocker vf1: 'VFIO device'")
    assert refused.all("MIGBLOCKD_BLOCKER_ID") == ["vf1"]
    assert d.stop() == 0


def test_native_entries_carry_the_blocker_and_the_peer(
        tmp_path: Path, daemons: list[DaemonProcess], journal: JournalSocket) -> None:
    d = start(tmp_path, "--log-level", "info", journal=True, journal_socket=journal.path)
    daemons.append(d)
    wait_ready(d)

    async def client() -> None:
        async with qmp_client(d.socket) as c:
            await c.ok("add-blocker", {"reason": "line one\nline two", "id": "jb1"})
            await c.ok("del-blocker", {"id": "jb1"})
            await c.ok("add-blocker", {"reason": "mine", "id": "jb2", "scope": "connection"})

    asyncio.run(client())
    pid, uid, gid = str(os.getpid()), str(os.getuid()), str(os.getgid())

    def about(text: str) -> Entry:
        return journal.wait_for(lambda e: text in e["MESSAGE"])

    connected = about(" connected")
    added = about("added blocker jb1")
    deleted = about("deleted blocker jb1")
    released = about("released 1 connection-scoped blocker(s): jb2")
    disconnected = about(" disconnected")
    for entry in (connected, added, deleted, released, disconnected):
        assert entry["PRIORITY"] == "6"
        assert entry["SYSLOG_IDENTIFIER"] == "migblockd"
        assert (entry["MIGBLOCKD_PEER_PID"], entry["MIGBLOCKD_PEER_UID"],
                entry["MIGBLOCKD_PEER_GID"]) == (pid, uid, gid)
        assert entry["MIGBLOCKD_CLIENT"] == connected["MIGBLOCKD_CLIENT"]
        assert len(entry.all("MESSAGE")) == 1
    assert connected.get("MIGBLOCKD_BLOCKER_ID") is None
    # The client's reason, escaped in the message: no forged entry.
    assert added["MESSAGE"].endswith("): 'line one\\nline two'"), added
    # journalctl MIGBLOCKD_BLOCKER_ID=jb1 finds the blocker's whole history.
    assert [e["MESSAGE"].split(": ", 1)[1].split(" ", 2)[:2]
            for e in journal.entries if "jb1" in e.all("MIGBLOCKD_BLOCKER_ID")] == [
        ["added", "blocker"], ["deleted", "blocker"]]
    assert [e for e in journal.entries if "jb2" in e.all("MIGBLOCKD_BLOCKER_ID")][-1] is released

    assert d.stop() == 0
    # What went to the journal natively is not on stderr a second time; the rest
    # is, with priorities.
    stderr = d.log()
    lines = [prefixed(line) for line in stderr.splitlines()]
    assert any(" ready on " in text for _, _, text in lines)
    for marker in ("connected", "added blocker", "deleted blocker", "released"):
        assert marker not in stderr, stderr


def test_records_go_to_stderr_when_the_journal_socket_goes_away(
        tmp_path: Path, daemons: list[DaemonProcess], journal: JournalSocket) -> None:
    d = start(tmp_path, "--log-level", "info", journal=True, journal_socket=journal.path)
    daemons.append(d)
    wait_ready(d)
    journal.close()  # journald stops

    async def client() -> None:
        async with qmp_client(d.socket) as c:
            await c.ok("add-blocker", {"reason": "r", "id": "gone1"})

    asyncio.run(client())
    line = d.wait_for_log(re.compile(r"^<6>INFO: client \d+ .*: added blocker gone1 .*$", re.M))
    assert line
    assert d.stop() == 0
    assert_clean_log(d)


def cpu_seconds(d: DaemonProcess) -> float:
    """The daemon's user and system CPU time so far (proc(5), /proc/PID/stat)."""
    fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_journal_that_takes_nothing_stops_nothing(
        tmp_path: Path, daemons: list[DaemonProcess], journal: JournalSocket) -> None:
    """journald's queue full: the writer waits for it (without spinning on a socket that
    cannot take more), the daemon serves on, and the loss is counted and reported."""
    cycles = 2000
    d = start(tmp_path, "--log-level", "info", journal=True, journal_socket=journal.path)
    daemons.append(d)
    wait_ready(d)
    for i in range(cycles):
        await cycle(d, i)
    assert d.proc.poll() is None
    # Not a timing check but a spinning one: idle, with journald stuck, the daemon
    # uses next to no CPU; a writer retrying send() in a loop would use a whole core.
    before = cpu_seconds(d)
    await asyncio.sleep(1.0)
    assert cpu_seconds(d) - before < 0.5
    stop = threading.Event()

    def drain() -> None:
        journal.sock.settimeout(0.1)
        while not stop.is_set():
            try:
                journal.entries.append(Entry(parse_entry(journal.sock.recv(1 << 17))))
            except TimeoutError:
                continue

    reader = threading.Thread(target=drain)
    reader.start()
    def accounted() -> tuple[int, int]:
        lost = sum(int(m.group(1)) for m in LOSS_LINE.finditer(d.log()))
        sent = sum(1 for e in list(journal.entries)
                   if CYCLE_LINE.search("INFO: " + e["MESSAGE"]))
        return sent, lost

    try:
        d.wait_for_log(LOSS_LINE, timeout=30)
        # Every record of the cycles is either in the journal or counted as lost.
        deadline = time.monotonic() + 30
        while sum(accounted()) != 4 * cycles and time.monotonic() < deadline:
            time.sleep(0.1)
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        stop.set()
        reader.join()
    sent, lost = accounted()
    assert lost > 0
    assert sent + lost == 4 * cycles, (sent, lost)
    assert_clean_log(d)


# --------------------------------------------------------------------------- JSON


def test_json_lines_carry_the_same_fields(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    d = start(tmp_path, "--log-level", "info", "--log-format", "json")
    daemons.append(d)
    wait_ready(d)

    async def client() -> None:
        async with qmp_client(d.socket) as c:
            await c.ok("add-blocker", {"reason": "r\nforged", "id": "js1"})
            await c.ok("del-blocker", {"id": "js1"})
            await c.ok("migrate", {"uri": "tcp:h:1"})
            await c.ok("migrate_cancel")

    asyncio.run(client())
    d.wait_for_log("disconnected")
    assert d.stop() == 0
    records = [json.loads(line) for line in d.log().splitlines()]
    for record in records:
        assert {"time", "level", "priority", "logger", "pid", "message"} <= record.keys()
        assert record["pid"] == d.proc.pid
    ready = [r for r in records if " ready on " in r["message"]]
    assert ready and ready[0]["level"] == "info" and ready[0]["priority"] == 6
    added = [r for r in records if "added blocker js1" in r["message"]]
    deleted = [r for r in records if "deleted blocker js1" in r["message"]]
    connected = [r for r in records if r["message"].endswith(" connected")]
    # Who cancelled: the status lines after it name no client.
    cancelled = [r for r in records if r["message"].endswith(
        ": migrate_cancel (migration status: setup)")]
    assert len(added) == len(deleted) == len(connected) == len(cancelled) == 1
    for record in (*added, *deleted, *connected, *cancelled):
        assert record["peer_pid"] == os.getpid()
        assert record["peer_uid"] == os.getuid()
        assert record["peer_gid"] == os.getgid()
        assert record["client"] == connected[0]["client"]
    assert added[0]["blocker_id"] == deleted[0]["blocker_id"] == "js1"
    assert "blocker_id" not in connected[0]
    assert added[0]["message"].endswith("'r\\nforged'")
    assert records[-1]["message"] == "stopped"
