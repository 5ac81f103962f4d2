"""Files and directories that chattr(1) marks immutable or append-only.

No mode or owner explains why root itself gets ``EPERM`` there: before these
messages, the start advised "let this user write in it" (to root), or "make it
writable by this user", and ``--check-config`` said "Permission denied" where
the start met "Operation not permitted", or "valid".  Each case below runs the
real daemon as root on a real ext4 attribute (``chattr``, which needs
CAP_LINUX_IMMUTABLE), and ``--check-config`` where it can tell beforehand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess
from test_config import make_state

from migblockd.startup import EXIT_NOTCONFIGURED
from migblockd.state.schema import MIGRATIONS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root")


def migblockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migblockd", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def marked(short_tmp: Path) -> Iterator[list[Path]]:
    """Paths to mark with ``chattr``; unmarked afterwards, so they can be removed."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["chattr", "-i", "-a", str(path)], check=False)


def chattr(marked: list[Path], flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True)
    marked.append(path)


def fix(path: Path, option: str, flag: str = "i") -> str:
    name, stops = (("immutable", "from changing it") if flag == "i"
                   else ("append-only", "from removing or renaming anything in it"))
    return (f"{path} is {name} (chattr +{flag}), which keeps even root {stops}: "
            f"chattr -{flag} {path}, or choose another {option}")


def assert_refused(args: list[str], message: str) -> None:
    """The start and ``--check-config`` refuse in these words."""
    started = migblockd(*args)
    assert started.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {message}\n" in started.stderr, started.stderr
    assert "Traceback" not in started.stderr
    check = migblockd("--check-config", *args)
    assert (check.returncode, check.stderr) == (EXIT_NOTCONFIGURED, f"migblockd: {message}\n")


@pytest.mark.parametrize("option", ["--socket", "--metrics"])
def test_a_socket_directory_that_is_immutable(short_tmp: Path, marked: list[Path],
                                              option: str) -> None:
    run = short_tmp / "run"
    run.mkdir(mode=0o755)
    (short_tmp / "made").mkdir(mode=0o755)
    chattr(marked, "+i", run)
    other = ["--metrics", str(short_tmp / "m.sock")] if option == "--socket" else [
        "--socket", str(short_tmp / "q.sock")]
    args = ["--ephemeral", *other, option, str(run / "x.sock")]
    assert_refused(args, f"cannot open the socket's lock file {run}/x.sock.lock: Operation "
                         f"not permitted; {fix(run, option)}")
    # One to be made in it.
    args = ["--ephemeral", *other, option, str(run / "sub" / "x.sock")]
    assert_refused(args, f"cannot create {run}/sub: Operation not permitted; "
                         f"{fix(run, option)}")
    # Unmarked, the same start serves (the first refusal was the attribute's).
    subprocess.run(["chattr", "-i", str(run)], check=True)
    assert migblockd("--check-config", *args).returncode == 0


def append_only_refusal(run: Path, option: str) -> str:
    return (f"refusing to serve from {run}: the daemon could not remove its socket when "
            f"it stops, nor the next start a stale one; {fix(run, option, 'a')}")


@pytest.mark.parametrize("option", ["--socket", "--metrics"])
def test_a_socket_directory_that_is_append_only(short_tmp: Path, marked: list[Path],
                                                option: str) -> None:
    # Found by review: a daemon started there once, then its stop ended in a
    # traceback (unlink: EPERM), and every later start refused the stale socket
    # that the check called valid.
    run = short_tmp / "run"
    run.mkdir(mode=0o755)
    other = ["--metrics", str(short_tmp / "m.sock")] if option == "--socket" else [
        "--socket", str(short_tmp / "q.sock")]
    args = ["--ephemeral", *other, option, str(run / "x.sock")]
    chattr(marked, "+a", run)
    assert_refused(args, append_only_refusal(run, option))
    assert list(run.iterdir()) == []  # refused before the lock file was made
    # With a stale socket in it too: the same words, from the check as well.
    subprocess.run(["chattr", "-a", str(run)], check=True)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(run / "x.sock"))
    (run / "x.sock.lock").touch()
    subprocess.run(["chattr", "+a", str(run)], check=True)
    assert_refused(args, append_only_refusal(run, option))


@pytest.mark.parametrize("option", ["--socket", "--metrics"])
def test_a_socket_directory_made_append_only_while_serving(short_tmp: Path,
                                                           marked: list[Path],
                                                           option: str) -> None:
    run = short_tmp / "run"
    run.mkdir(mode=0o755)
    path = run / "x.sock"
    other = ["--metrics", str(short_tmp / "m.sock")] if option == "--socket" else [
        "--socket", str(short_tmp / "q.sock")]
    qmp = path if option == "--socket" else short_tmp / "q.sock"
    daemon = subprocess.Popen([sys.executable, "-m", "migblockd", "--ephemeral", *other,
                               option, str(path)],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (qmp.exists() and path.exists()):
            assert daemon.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(qmp))
            assert client.recv(4096).startswith(b'{"QMP"')  # ready, serving
        chattr(marked, "+a", run)
        daemon.terminate()
        _, stderr = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    # The stop goes on to its end, says what it left and why, and exits cleanly.
    assert "Traceback" not in stderr, stderr
    assert daemon.returncode == 0, stderr
    assert (f"ERROR: cannot remove the socket {path}: Operation not permitted; "
            f"{run} is append-only (chattr +a), which keeps even root from removing or "
            f"renaming anything in it: chattr -a {run}\n") in stderr, stderr
    assert stderr.rstrip().endswith("INFO: stopped"), stderr
    # Its lock was given up all the same; the next start names the attribute.
    assert_refused(["--ephemeral", *other, option, str(path)],
                   append_only_refusal(run, option))


@pytest.mark.parametrize("option", ["--socket", "--state-dir"])
def test_a_lock_file_that_is_append_only(short_tmp: Path, marked: list[Path],
                                         option: str) -> None:
    # Found by review: the check said valid (only immutable counted), the start
    # refused; and the words spoke of a directory.
    place = short_tmp / "place"
    place.mkdir(mode=0o700)
    if option == "--socket":
        lock = place / "q.sock.lock"
        args = ["--ephemeral", "--socket", str(place / "q.sock")]
        opening = f"cannot open the socket's lock file {lock}"
    else:
        lock = place / "lock"
        args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(place)]
        opening = f"cannot open {lock}"
    lock.touch(mode=0o600)
    chattr(marked, "+a", lock)
    assert_refused(args, f"{opening}: Operation not permitted; {lock} is append-only "
                         "(chattr +a), which keeps even root from writing it anywhere but "
                         f"at its end: chattr -a {lock}, or choose another {option}")


def test_a_state_directory_that_is_immutable(short_tmp: Path, marked: list[Path]) -> None:
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    chattr(marked, "+i", state)
    args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(state)]
    assert_refused(args, f"cannot open {state}/lock: Operation not permitted; "
                         f"{fix(state, '--state-dir')}")
    # One to be made in it.
    args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(state / "sub")]
    assert_refused(args, f"cannot create state directory {state}/sub: Operation not "
                         f"permitted; {fix(state, '--state-dir')}")


def test_a_state_database_that_is_immutable(short_tmp: Path, marked: list[Path]) -> None:
    state = short_tmp / "state"
    args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(state)]
    make_state(state)
    database = state / "state.db"
    chattr(marked, "+i", database)
    # The check opens it as the start does (not with SQLite): it says it too.
    assert_refused(args, f"cannot read and write {database}: Operation not permitted; "
                         f"{fix(database, '--state-dir')}")


@pytest.mark.parametrize("held", ["lock and database", "lock only"])
def test_a_used_state_directory_made_immutable(short_tmp: Path, marked: list[Path],
                                               held: str) -> None:
    # Found by review: with its lock there, the check said valid and the start
    # gave SQLite's "unable to open database file" with advice to make the
    # directory writable by this user (root).  SQLite makes the log at every
    # start after a clean stop; the database, when there is none.
    state = short_tmp / "state"
    make_state(state)
    assert sorted(p.name for p in state.iterdir()) == ["lock", "state.db"]
    missing = state / "state.db-wal"
    if held == "lock only":
        (state / "state.db").unlink()
        missing = state / "state.db"
    chattr(marked, "+i", state)
    args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(state)]
    assert_refused(args, f"cannot create {missing}: Operation not permitted; "
                         f"{fix(state, '--state-dir')}")
    subprocess.run(["chattr", "-i", str(state)], check=True)
    assert migblockd("--check-config", *args).returncode == 0


async def test_a_state_directory_that_is_append_only(
        short_tmp: Path, marked: list[Path],
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # Found by review: the first start failed on a "disk I/O error" (SQLite could
    # not rename the new database into place) and left state.db.new behind, which
    # every later start asked to "move away", as the attribute forbids.
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    chattr(marked, "+a", state)
    args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(state)]
    assert_refused(args, f"cannot create {state}/state.db (made under another name, then "
                         f"renamed into place); {fix(state, '--state-dir', 'a')}")
    assert [p.name for p in state.iterdir()] == ["lock"]  # nothing of SQLite's
    # One that holds its database serves, and keeps what it was told: SQLite
    # only makes its log there (and cannot remove it at the stop, which it
    # tolerates). Review found this refused by a first version of the check.
    subprocess.run(["chattr", "-a", str(state)], check=True)
    (state / "lock").unlink()
    make_state(state)
    subprocess.run(["chattr", "+a", str(state)], check=True)
    assert migblockd("--check-config", *args).returncode == 0
    for round_ in range(2):
        daemon = start_daemon("--state-dir", str(state), socket=short_tmp / "q.sock")
        async with daemon.client() as c:
            await c.ok("add-blocker", {"id": f"b{round_}", "reason": "kept"})
            listed = [b["id"] for b in await c.ok("query-blockers")]
        assert daemon.stop() == 0
        assert listed == [f"b{i}" for i in range(round_ + 1)]
        assert "Traceback" not in daemon.log()


def test_a_reload_looking_at_an_append_only_state_directory_keeps_sqlites_locks(
        short_tmp: Path, marked: list[Path],
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # Found by review: a reload whose state-dir names the daemon's own directory
    # another way read the database's format, where the directory is append-only,
    # through a descriptor of its own; closing it dropped every POSIX lock the
    # daemon held on the file, SQLite's included, so another connection (an
    # operator's sqlite3) would take itself for the only one.
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    make_state(state)
    chattr(marked, "+a", state)
    (short_tmp / "link").symlink_to(state)
    config = short_tmp / "m.toml"
    config.write_text(f'state-dir = "{state}"\nlog-level = "info"\n')
    daemon = start_daemon("--config", str(config), socket=short_tmp / "q.sock",
                          own_state=False)
    inode = (state / "state.db").stat().st_ino

    def sqlites_locks() -> list[str]:
        return [line for line in Path("/proc/locks").read_text().splitlines()
                if " POSIX " in line and f" {daemon.proc.pid} " in line
                and line.split()[5].endswith(f":{inode}")]

    assert sqlites_locks()
    config.write_text(f'state-dir = "{short_tmp / "link"}"\nlog-level = "info"\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(f"reload: {config}:1: state-dir changed, which only a restart applies")
    assert sqlites_locks()
    assert daemon.stop() == 0


def empty_database(database: Path) -> None:
    """A SQLite file with nothing in it, of format 0: as an older migblockd made it."""
    conn = sqlite3.connect(database)
    conn.execute("VACUUM")  # writes its first page
    conn.close()
    database.chmod(0o600)


def refused_migration(state: Path, version: int, current: int, made: str = "") -> str:
    return (f"cannot migrate {state}/state.db from format {version}{made} to {current}: "
            f"the migration removes the journals it writes in {state}; "
            f"{fix(state, '--state-dir', 'a')}")


def test_an_append_only_state_directory_refuses_an_empty_database(
        short_tmp: Path, marked: list[Path]) -> None:
    # Found by review: the start failed on a "disk I/O error" (SQLite could not
    # remove the journal it wrote to turn the file to WAL) and left it there.
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    empty_database(state / "state.db")
    before = (state / "state.db").read_bytes()
    chattr(marked, "+a", state)
    args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(state)]
    assert_refused(args, refused_migration(state, 0, len(MIGRATIONS), " (empty, as an older "
                                                                       "migblockd made it)"))
    assert sorted(p.name for p in state.iterdir()) == ["lock", "state.db"]  # nothing written
    assert (state / "state.db").read_bytes() == before
    # Unmarked, the same start migrates it and serves.
    subprocess.run(["chattr", "-a", str(state)], check=True)
    assert migblockd("--check-config", *args).returncode == 0


def test_an_append_only_state_directory_refuses_a_migration(
        short_tmp: Path, marked: list[Path]) -> None:
    # Found by review: the copy kept before migrating (state.db.format-1) was left
    # with its journal, and the next start asked to "move it away", as the
    # attribute forbids.  A format later than the daemon's is played by the store
    # with one more step, in a process of its own.
    state = short_tmp / "state"
    make_state(state)
    chattr(marked, "+a", state)
    for _ in range(2):  # and again: nothing left behind to refuse instead
        migrated = subprocess.run(
            [sys.executable, "-c",
             "import sys; from pathlib import Path; "
             "from migblockd.state import StateError, Store; "
             "from migblockd.state.schema import MIGRATIONS\n"
             "def step(conn): conn.execute('CREATE TABLE extra (x)')\n"
             "try: Store.open(Path(sys.argv[1]), (*MIGRATIONS, step), "
             "restore=lambda s: None).close()\n"
             "except StateError as e: sys.exit(str(e))",
             str(state)], capture_output=True, text=True, timeout=30)
        assert (migrated.returncode, migrated.stderr) == (
            1, refused_migration(state, len(MIGRATIONS), len(MIGRATIONS) + 1) + "\n")
        assert sorted(p.name for p in state.iterdir()) == ["lock", "state.db"]


def test_an_append_only_state_directory_whose_format_is_in_the_log_is_not_refused(
        short_tmp: Path, marked: list[Path], start_daemon: Callable[..., DaemonProcess]) -> None:
    # The check reads the format without opening the database: as a crash leaves
    # it, the file says format 0 and its log the migration to 1, which the start
    # reads and needs no migration for.
    state, work = short_tmp / "state", short_tmp / "work"
    state.mkdir(mode=0o700)
    work.mkdir()
    empty_database(work / "state.db")
    conn = sqlite3.connect(work / "state.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("BEGIN")
    for step in MIGRATIONS:
        step(conn)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
    conn.execute("COMMIT")
    for name in ("state.db", "state.db-wal"):  # not folded back yet
        shutil.copy(work / name, state / name)
    conn.close()
    assert (state / "state.db").read_bytes()[60:64] == bytes(4)  # format 0 in the file
    chattr(marked, "+a", state)
    args = ["--socket", str(short_tmp / "q.sock"), "--state-dir", str(state)]
    checked = migblockd("--check-config", *args)
    assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr
    daemon = start_daemon("--state-dir", str(state), socket=short_tmp / "q.sock")
    daemon.wait_for_log(f"restored 0 blockers from {state}/state.db")
    assert daemon.stop() == 0
