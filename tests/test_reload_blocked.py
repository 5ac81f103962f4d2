"""A reload whose check blocks, under a stop: the real daemon, held by strace.

A reload runs its restart-only checks (reading a changed schema, resolving a
``metrics`` host) off the event loop.  A check that does not return (a file
system that hangs) must neither keep the stopped daemon alive nor, ending
during the stop, tell systemd ``READY=1`` after ``STOPPING=1``.  strace holds
the check's ``openat`` of the schema (and only that call) for as long as the
test needs it.  A check that fails instead (strace fails the making of its
thread) still ends the reload with ``READY=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from conftest import DaemonProcess, assert_clean_log
from faults import injecting, opened
from realqemu import wait_until
from test_systemd_stopping import until

from migblockd.reload_order import HELD

Start = Callable[..., DaemonProcess]

#: How long strace holds the check's open: longer than any wait of the test.
HOLD_USEC = 600 * 1_000_000


def ended(pid: int) -> bool:
    """``pid`` has exited (a zombie: a thread that strace holds is not reaped yet)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "Z"


def times_open(pid: int, path: Path) -> int:
    """How many descriptors of ``pid`` are open on ``path``."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since listed
            count += os.readlink(fd) == str(path)
    return count


def broken_schema(tmp_path: Path) -> Path:
    """A schema that a check, once it has read it, says would fail the next start."""
    root = tmp_path / "broken.json"
    root.write_text("{ 'enum': 'MigMode' }\n")
    return root


def reloading_with(config: Path, schema: Path) -> None:
    config.write_text(f'log-level = "info"\nschema = "{schema}"\n')


def schema_refused(config: Path) -> str:
    """What the reload's check says of the broken schema that ``config`` names on its
    second line, as every test here writes it: the setting, at its line."""
    return f"the next start would fail: {config}:2: schema: bad schema"


def ready(start_daemon: Start, config: Path, notify: socket.socket
          ) -> tuple[DaemonProcess, list[dict[str, str]]]:
    """A daemon on ``config`` (written now), notifying ``notify``, once it said READY=1;
    and what it has said."""
    config.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(config), "--ephemeral",
                     env={**os.environ, "NOTIFY_SOCKET": notify.getsockname()})
    seen: list[dict[str, str]] = []
    until(notify, lambda f: f.get("READY") == "1", seen)
    return d, seen


@asynccontextmanager
async def check_held(start_daemon: Start, tmp_path: Path
                     ) -> AsyncIterator[tuple[DaemonProcess, Path, Path]]:
    """A daemon (its config file, and a broken schema) whose reload's check strace
    holds at the schema's open, for the block: (daemon, config, schema)."""
    root = broken_schema(tmp_path)
    config = tmp_path / "m.toml"
    config.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(config), "--ephemeral")
    async with injecting(d.proc.pid, "openat", f"delay_exit={HOLD_USEC}", "the daemon",
                         paths=[root]):
        reloading_with(config, root)
        d.signal(signal.SIGHUP)
        await wait_until(lambda: opened(d.proc.pid, root), "the reload's check at the schema")
        yield d, config, root


@contextmanager
def lingering(path: Path) -> Iterator[None]:
    """A client that, once the stop has half-closed its connection, keeps sending
    (blanks, which the daemon discards): the stop waits for it, for at most the
    drain's 30 s, until the block ends."""
    done = threading.Event()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.recv(65536)  # the greeting
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    sock.recv(65536)

    def keep_sending() -> None:
        while not done.wait(0.1):
            sock.send(b" ")

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        yield
    finally:
        done.set()
        sender.join()
        sock.close()


async def test_a_reload_blocked_in_its_check_does_not_keep_the_stopped_daemon_alive(
    start_daemon: Start, tmp_path: Path,
) -> None:
    # Reproduced first: "stopped" was logged, and the process lived on (the end of
    # asyncio.run joins the thread the check ran on) until the check returned.
    async with check_held(start_daemon, tmp_path) as (d, _, _):
        d.signal(signal.SIGTERM)
        d.wait_for_log("INFO: stopped")
        # Exited, with the check still held.
        await wait_until(lambda: ended(d.proc.pid), "the daemon's exit")
    assert d.wait_exit() == 0
    # Had the check ended, it would have said the schema is broken.
    assert "the next start would fail" not in d.log()
    assert_clean_log(d)


async def test_a_reload_that_ends_during_the_stop_says_nothing_more_to_systemd(
    start_daemon: Start, tmp_path: Path, notify: socket.socket,
) -> None:
    # Reproduced first: the reload's READY=1 came after STOPPING=1, which tells
    # systemd that the stopping service runs again.
    root = broken_schema(tmp_path)
    config = tmp_path / "m.toml"
    d, seen = ready(start_daemon, config, notify)
    with lingering(d.socket):
        async with injecting(d.proc.pid, "openat", f"delay_exit={HOLD_USEC}", "the daemon",
                             paths=[root]):
            reloading_with(config, root)
            d.signal(signal.SIGHUP)
            await wait_until(lambda: opened(d.proc.pid, root),
                             "the reload's check at the schema")
            until(notify, lambda f: f.get("RELOADING") == "1", seen)
            d.signal(signal.SIGTERM)
            until(notify, lambda f: f.get("STOPPING") == "1", seen)
        # strace gone, the check goes on, and ends while the client holds the stop.
        await wait_until(lambda: schema_refused(config) in d.log(),
                         "the reload's check to end")
    assert d.wait_exit() == 0
    log = d.log()
    assert log.index("the next start would fail") < log.index("INFO: stopped")
    notify.setblocking(False)
    after: list[str] = []
    while True:
        try:
            after.append(notify.recv(4096).decode())
        except BlockingIOError:
            break
    assert not [datagram for datagram in after if "READY=1" in datagram.splitlines()], after
    assert_clean_log(d)


async def test_a_reload_whose_check_fails_still_tells_systemd_it_is_ready(
    start_daemon: Start, tmp_path: Path, notify: socket.socket,
) -> None:
    # Reproduced first with a metrics host the IDNA codec refused: the check's
    # exception ended the reload ("Task exception was never retrieved"), and
    # systemd heard RELOADING=1 and never READY=1, the unit stuck "reloading".
    # Here no thread can be made for the check: strace fails every clone.
    config = tmp_path / "m.toml"
    d, seen = ready(start_daemon, config, notify)
    async with injecting(d.proc.pid, "clone,clone3", "error=EAGAIN", "the daemon"):
        config.write_text('log-level = "info"\nmax-clients = 1\nmigration-time = 9\n')
        d.signal(signal.SIGHUP)
        until(notify, lambda f: f.get("RELOADING") == "1", seen)
        until(notify, lambda f: f.get("READY") == "1", seen)
    # Applied, and the check's failure said with what it was about.
    d.wait_for_log("INFO: reloaded configuration: max-clients=1\n")
    d.wait_for_log("ERROR: reload: applied, but checking whether the next start would fail "
                   "with migration-time as the file now sets it failed\n")
    assert "exception was never retrieved" not in d.log()
    # The next reload runs its check again.
    config.write_text(f'log-level = "info"\nschema = "{broken_schema(tmp_path)}"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log(schema_refused(config))
    assert d.stop() == 0


async def test_a_reload_held_in_its_check_keeps_no_later_reload_waiting(
    start_daemon: Start, tmp_path: Path,
) -> None:
    # Found by review: the look ahead of one reload, held (a resolver, a network
    # file system), kept every later reload from applying its file, silently.
    async with check_held(start_daemon, tmp_path) as (d, config, root):
        config.write_text(f'log-level = "info"\nschema = "{root}"\nmax-clients = 50\n')
        d.signal(signal.SIGHUP)
        d.wait_for_log("INFO: reloaded configuration: max-clients=50\n")
    # Both checks go on now.  The first one's findings are no longer news (found by
    # review: they came last, about a file that may have changed since): only the
    # second reload's are said.
    await wait_until(lambda: schema_refused(config) in d.log(),
                     "the reload's check to end")
    await asyncio.sleep(1)
    assert d.log().count("the next start would fail") == 1
    d.signal(signal.SIGTERM)
    d.wait_for_log("INFO: stopped")
    assert_clean_log(d)


async def test_a_reload_whose_file_is_held_keeps_clients_served_and_the_next_says_why(
    start_daemon: Start, tmp_path: Path,
) -> None:
    # Found by review: the file was read on the event loop, every client waiting
    # for it (2 s for a 200 MB file; a hung network file system: until the
    # watchdog).  Now on a thread; a later reload waits for it a while, then reads
    # the file anew without it, and says so.
    config = tmp_path / "m.toml"
    config.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(config), "--ephemeral")
    async with injecting(d.proc.pid, "openat", f"delay_exit={HOLD_USEC}", "the daemon",
                         paths=[config]):
        config.write_text('log-level = "info"\nmax-clients = 50\n')
        d.signal(signal.SIGHUP)
        await wait_until(lambda: opened(d.proc.pid, config), "the reload's read of its file")
        async with d.client() as c:
            await c.ok("add-blocker", {"id": "served", "reason": "r"})
        d.signal(signal.SIGHUP)
        d.wait_for_log(f"WARNING: reload: the reload before has been reading {config} or "
                       f"asking the user and group databases for more than {HELD:g} s (they "
                       "do not answer); this one does not wait for it, and once it applies "
                       "the file, that one applies nothing")
        await wait_until(lambda: times_open(d.proc.pid, config) == 2,
                         "the second reload's read of its file")
        d.signal(signal.SIGTERM)
        d.wait_for_log("INFO: stopped")
    assert "reloaded configuration" not in d.log()
    assert_clean_log(d)
