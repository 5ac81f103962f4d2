"""The socket nobody can steal: its directory, its lock, its permissions.

Reproduced before the fix: with ``${TMPDIR:-/tmp}/migblockd-UID`` pre-created
0777 by another user the daemon started in it, and that user renamed the
socket away and bound an impostor; ``chmod(path)`` after ``bind`` followed a
symlink swapped in meanwhile; two daemons started together on a stale socket
both served.  "Another user" is a real one: ``setpriv`` runs the attacker as
uid 65534 (the tests run as root, which owns everything else here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import READY_LINE, ROOT, DaemonProcess, spawn_daemon
from faults import delayed
from qmpclient import blocking_client

from benchmarks.scale import preload
from migblockd.listen import bind_socket
from migblockd.socketdir import check_socket_directory, make_socket_dir
from migblockd.startup import EXIT_NOTCONFIGURED, StartupError

NOBODY = 65534
AS_ROOT = os.geteuid() == 0


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.fixture
def top(short_tmp: Path) -> Iterator[Path]:
    """A directory under /tmp everyone may enter (as ``/tmp`` itself is)."""
    short_tmp.chmod(0o755)
    yield short_tmp


def refused(start_daemon: Callable[..., DaemonProcess], sock: Path) -> str:
    d = start_daemon(socket=sock, wait=False)
    assert d.wait_exit() == EXIT_NOTCONFIGURED, d.log()
    log = d.log()
    assert READY_LINE not in log and "Traceback" not in log, log
    assert not sock.exists()
    return log


# --------------------------------------------------------------------------- the directory


@pytest.mark.skipif(not AS_ROOT, reason="giving a directory to another user takes root")
def test_a_directory_owned_by_another_user_is_refused(
    start_daemon: Callable[..., DaemonProcess], top: Path,
) -> None:
    directory = top / f"migblockd-{os.geteuid()}"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    log = refused(start_daemon, directory / "migblockd.sock")
    assert (f"refusing to serve from {directory}: socket directory {directory} is owned by "
            f"uid {NOBODY} (nobody), not by this user (uid 0) or root, so its owner could "
            "replace the socket; choose another --socket") in log, log
    # Found by review: "chown it", as for a state directory, is no advice for what may
    # be a user's home.
    # Root's --check-config cannot tell whether the daemon will run as root or as
    # that user (the units' User=): it calls the settings valid, and says what it
    # left to the start.  Before, it said nothing of it, and a start as root failed.
    state = top / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    check = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--socket",
         str(directory / "migblockd.sock"), "--state-dir", str(state / "sub")],
        capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check
    assert check.stderr.splitlines() == [
        f"migblockd: {option}: {place} belongs to uid {NOBODY} (nobody), not judged here: a "
        "daemon running as that user may use it, one running as root refuses it"
        for option, place in (("--socket", directory), ("--state-dir", state))], check
    # A setting from the file is named as the file's, not as an option nobody gave.
    config = top / "m.toml"
    config.write_text(f'state-dir = "{state / "sub"}"\n')
    config.chmod(0o600)
    check = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--config", str(config),
         "--socket", str(top / "own" / "migblockd.sock")],
        capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check
    assert check.stderr.splitlines() == [
        f"migblockd: {config}:1: state-dir: {state} belongs to uid {NOBODY} (nobody), not "
        "judged here: a daemon running as that user may use it, one running as root "
        "refuses it"], check


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_a_directory_others_may_write_to_is_refused(
    start_daemon: Callable[..., DaemonProcess], top: Path, mode: int,
) -> None:
    directory = top / "shared"
    directory.mkdir()
    directory.chmod(mode)
    log = refused(start_daemon, directory / "migblockd.sock")
    assert (f"refusing to serve from {directory}: socket directory {directory} is writable "
            f"by others (mode {mode:04o}), so they could replace the socket; chmod go-w "
            f"{directory}, or choose another --socket") in log, log


@pytest.mark.skipif(not AS_ROOT, reason="starts the daemon as root, in a directory of root's")
def test_a_directory_whose_acl_lets_only_trusted_users_write_is_served_from(
    start_daemon: Callable[..., DaemonProcess], top: Path,
) -> None:
    """Found by review: under an access ACL the mode's group bits are only its
    mask, and a 0755 directory that ``setfacl -m u:65534:rx,m::rwx`` made 0775,
    where no one but root may write, was refused as "writable by others (mode
    0775)".  It is judged by its entries, as the kernel judges them: one that lets
    a user write is refused, named with the setfacl that takes the write away,
    and after that setfacl the daemon serves there.  Real setfacl, a real daemon."""
    directory = top / "acl"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    sock = directory / "migblockd.sock"
    # A named entry for root itself lets no one else write.
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rx,u:0:rwx,m::rwx", str(directory)],
                   check=True)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o775  # the mask's bits
    d = start_daemon(socket=sock)
    blocking_client(sock).close()
    d.stop()

    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rwx,g::rwx", str(directory)], check=True)
    log = refused(start_daemon, sock)
    fix = f"setfacl -n -m u:{NOBODY}:rx,g::rx {directory}"
    assert (f"refusing to serve from {directory}: socket directory {directory} has an ACL "
            f"that lets uid {NOBODY} (nobody), the members of gid 0 (root) write to it (mode "
            "0775, whose group bits are the ACL's mask), so they could replace the socket; "
            f"{fix}, or choose another --socket") in log, log
    subprocess.run(fix.split(), check=True)  # what the refusal says to do
    d = start_daemon(socket=sock)
    blocking_client(sock).close()

    # The others' entry is not masked: it lets everyone write, whatever the mask.
    subprocess.run(["setfacl", "-m", "o::rwx,m::rx", str(directory)], check=True)
    with pytest.raises(StartupError, match=r"has an ACL that lets everyone write to it \(mode "
                       r"0757, .*; setfacl -n -m o::rx "):
        check_socket_directory(directory)


def test_a_missing_socket_directory_is_judged_before_it_is_made(
    start_daemon: Callable[..., DaemonProcess], top: Path,
) -> None:
    # The start made open/sub/run (0700), refused it for open's mode, and left it
    # behind; --check-config called it valid.
    (top / "open").mkdir()
    (top / "open").chmod(0o777)
    sock = top / "open" / "sub" / "run" / "migblockd.sock"
    log = refused(start_daemon, sock)
    why = (f"{top}/open, above socket directory {sock.parent}, is writable by others (mode "
           "0777), so they could replace the socket")
    assert f"refusing to serve from {sock.parent}: {why}" in log, log
    assert not (top / "open" / "sub").exists()
    check = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral", "--socket",
         str(sock)], capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == EXIT_NOTCONFIGURED and why in check.stderr, check
    assert not (top / "open" / "sub").exists()
    # Sticky, as /tmp is: made and served.
    (top / "open").chmod(0o1777)
    check = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral", "--socket",
         str(sock)], capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check


def test_a_directory_above_that_others_may_write_to_is_refused(top: Path) -> None:
    (top / "open" / "mine").mkdir(parents=True)
    (top / "open").chmod(0o777)
    (top / "open" / "mine").chmod(0o700)
    with pytest.raises(StartupError, match=r"open, above socket directory .*/mine, is "
                       r"writable by others \(mode 0777\)"):
        check_socket_directory(top / "open" / "mine")
    # Sticky, as /tmp is: others may add entries but not rename ours.
    (top / "open").chmod(0o1777)
    check_socket_directory(top / "open" / "mine")


def test_a_symlink_does_not_lead_around_the_rule(top: Path) -> None:
    (top / "open").mkdir(mode=0o777)
    (top / "open").chmod(0o777)
    (top / "link").symlink_to(top / "open")
    with pytest.raises(StartupError, match=r"refusing to serve from .*/link: socket directory "
                       r".*/link \(which is .*/open\) is writable by others \(mode 0777\), "
                       r"so they could replace the socket; chmod go-w .*/open,"):
        check_socket_directory(top / "link")


def test_dot_dot_after_a_symlink_is_judged_where_the_kernel_goes(top: Path) -> None:
    # link/.. is the directory above the link's target, as the kernel opens it;
    # folded lexically it was the directory holding the link, checked in its place.
    (top / "w").mkdir(mode=0o755)
    (top / "there" / "dir").mkdir(parents=True, mode=0o700)
    (top / "there").chmod(0o700)
    (top / "w" / "link").symlink_to(top / "there" / "dir")
    (top / "w" / "run").mkdir(mode=0o777)
    (top / "w" / "run").chmod(0o777)  # what the lexical folding judged
    (top / "there" / "run").mkdir(mode=0o700)
    check_socket_directory(top / "w" / "link" / ".." / "run")
    (top / "there" / "run").chmod(0o777)
    with pytest.raises(StartupError, match=r"socket directory .*/w/link/\.\./run \(which is "
                       r".*/there/run\) is writable by others \(mode 0777\)"):
        check_socket_directory(top / "w" / "link" / ".." / "run")
    (top / "there" / "run").chmod(0o700)
    # Who may write the directory holding the link could point it elsewhere.
    (top / "w").chmod(0o777)
    with pytest.raises(StartupError, match=r": .*/w, on the way to socket directory "
                       r".*/w/link/\.\./run \(which is .*/there/run\), is writable by others"):
        check_socket_directory(top / "w" / "link" / ".." / "run")
    (top / "w").chmod(0o755)
    # ...and so could whoever may write a directory the path goes through and
    # leaves by "..", which the lexical folding skipped.
    (top / "w" / "deep").mkdir(mode=0o777)
    (top / "w" / "deep").chmod(0o777)
    (top / "w" / "deep" / "link").symlink_to(top / "there" / "dir")
    with pytest.raises(StartupError, match=r": .*/w/deep, on the way to socket directory"):
        check_socket_directory(top / "w" / "deep" / "link" / ".." / "run")


def test_a_fresh_directory_and_a_private_one_are_accepted(
    start_daemon: Callable[..., DaemonProcess], top: Path,
) -> None:
    fresh = top / "a" / "b"
    d = start_daemon(socket=fresh / "migblockd.sock")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    assert d.stop() == 0
    private = top / "private"
    private.mkdir(mode=0o755)
    d = start_daemon(socket=private / "migblockd.sock")
    assert d.stop() == 0


@pytest.mark.skipif(not AS_ROOT, reason="needs root to act as another user")
async def test_the_impostor_cannot_take_the_socket(
    start_daemon: Callable[..., DaemonProcess], top: Path,
) -> None:
    # The attack of the issue, in a directory the daemon accepts: another user
    # cannot rename the socket away, nor put anything in its place.
    d = start_daemon(socket=top / "run" / "migblockd.sock")
    assert stat.S_IMODE(os.stat(d.socket.parent).st_mode) == 0o700
    moved = as_nobody("mv", str(d.socket), str(top / "stolen.sock"))
    assert moved.returncode != 0 and "Permission denied" in moved.stderr, moved
    planted = as_nobody("ln", "-s", "/dev/null", str(d.socket.parent / "impostor"))
    assert planted.returncode != 0, planted
    async with d.client() as c:
        assert (await c.ok("query-version"))["package"].startswith("migblockd ")
    assert d.stop() == 0


# --------------------------------------------------------------------------- permissions


SWAPPER = """
import os, sys
sock, victim, aside = sys.argv[1:4]
while True:
    try:
        os.rename(sock, aside)
        os.symlink(victim, sock)
    except OSError:
        pass
"""


def test_permissions_are_never_set_through_a_swapped_in_symlink(tmp_path: Path) -> None:
    # Another process turns the socket into a symlink to a victim file as fast as it
    # can while the socket is bound again and again: a chmod by name after bind(2)
    # would make the victim as open as the socket in about 1 bind of 100 here.
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    sock = directory / "s.sock"
    swapper = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SWAPPER), str(sock),
                                str(victim), str(directory / "aside")])
    bound = 0
    try:
        deadline = time.monotonic() + 60
        while bound < 2000 and time.monotonic() < deadline:
            for leftover in (sock, directory / "aside"):
                leftover.unlink(missing_ok=True)
            try:
                listening = bind_socket(sock, 0o666)
            except StartupError:
                continue  # the swapper won before bind: a symlink is not replaced
            listening.sock.close()
            listening.lock.release()
            bound += 1
            assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    finally:
        swapper.kill()
        swapper.wait()
    assert bound == 2000
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    assert victim.read_text() == "secret"


DIR_SWAPPER = """
import os, sys
directory, victim, aside = sys.argv[1:4]
n = 0
while True:
    if os.path.islink(directory):
        continue
    try:
        os.rename(directory, f"{aside}{n}")
        n += 1
        os.symlink(victim, directory)
    except OSError:
        pass
"""


@pytest.mark.skipif(not AS_ROOT, reason="giving a directory another group takes root")
def test_a_new_directory_gets_its_mode_and_group_through_a_descriptor(tmp_path: Path) -> None:
    # Another process with write access to the parent moves each directory the daemon
    # makes aside and plants a symlink to a victim directory in its place, as fast as it
    # can: a chown and chmod by name after mkdir(2) gave the victim the socket
    # directory's group and mode (within the 2000 creations, in most runs here), or
    # stopped the daemon with a reason that was not the one ("must be a member of
    # the group").
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o755)
    before = os.stat(victim)
    parent = tmp_path / "shared"
    parent.mkdir()
    directory = parent / "run"
    aside = tmp_path / "aside"
    aside.mkdir()
    swapper = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DIR_SWAPPER),
                                str(directory), str(victim), str(aside / "d")])
    left = tmp_path / "left"
    left.mkdir()
    made = refused = 0
    try:
        deadline = time.monotonic() + 60
        while made < 2000 and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                while True:  # what the last round left, and what the swapper planted since
                    os.rename(directory, left / str(time.monotonic_ns()))
            for d in aside.iterdir():
                d.rename(left / d.name)
            error: StartupError | None = None
            try:
                make_socket_dir(directory, 0o660, NOBODY)
            except StartupError as exc:
                error = exc
            after = os.stat(victim)
            assert (stat.S_IMODE(after.st_mode), after.st_gid) == (0o755, before.st_gid)
            if error is not None:
                # Swapped before the descriptor was opened: refused, nothing followed.
                assert "something else took its place as it was created" in str(error), error
                refused += 1
                continue
            made += 1
            # What was made got its group and mode: where it is, or, moved aside after
            # the descriptor was opened, there.
            for d in [directory, *aside.iterdir()]:
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(d)
                    if stat.S_ISDIR(st.st_mode):
                        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, NOBODY), d
    finally:
        swapper.kill()
        swapper.wait()
    assert made == 2000, (made, refused)
    after = os.stat(victim)
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (0o755, before.st_gid)


# --------------------------------------------------------------------------- one daemon per path


def test_two_daemons_started_together_on_a_stale_socket_never_both_serve(
    tmp_path: Path,
) -> None:
    for trial in range(50):
        workdir = tmp_path / f"t{trial}"
        workdir.mkdir(mode=0o700)
        path = workdir / "migblockd.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()
        pair = [spawn_daemon(workdir, "--ephemeral", wait=False) for _ in range(2)]
        try:
            # One serves; the other exits at once, saying who holds the socket.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if [d for d in pair if d.proc.poll() is not None]:
                    break
                time.sleep(0.02)
            exited = [d for d in pair if d.proc.poll() is not None]
            assert len(exited) == 1, [d.log() for d in pair]
            loser, = exited
            winner, = (d for d in pair if d is not loser)
            assert loser.proc.returncode == 1, loser.log()
            assert READY_LINE not in loser.log()
            assert (f"is already serving {path}; refusing to start a second one"
                    in loser.log()), loser.log()
            winner.wait_for_log(READY_LINE)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(10)
            probe.connect(str(path))
            assert probe.recv(4096).startswith(b'{"QMP"'), trial
            probe.close()
            assert winner.stop() == 0
        finally:
            for d in pair:
                if d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait()
        shutil.rmtree(workdir)


def test_a_client_that_sees_the_socket_finds_it_listening(tmp_path: Path) -> None:
    # Reproduced first: the socket's file appeared at bind(), and the daemon listened
    # only once it had given it its group and ACL: a script that connected as soon as
    # the file appeared was refused (ECONNREFUSED).  strace holds listen() back 2 s.
    python = delayed("listen", 2_000_000, tmp_path, "the daemon's listen()")
    daemon = spawn_daemon(tmp_path, "--ephemeral", wait=False, python=python)
    try:
        deadline = time.monotonic() + 60
        while not os.path.lexists(daemon.socket):
            assert daemon.proc.poll() is None and time.monotonic() < deadline, daemon.log()
            time.sleep(0.005)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(30)
        probe.connect(str(daemon.socket))  # refused before the fix
        assert probe.recv(4096).startswith(b'{"QMP"')
        probe.close()
        daemon.wait_for_log(READY_LINE)
        assert sorted(p.name for p in daemon.socket.parent.iterdir()
                      if p.name.startswith(".")) == []  # its staging name is gone
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def test_a_staging_socket_left_by_a_killed_daemon_is_removed(tmp_path: Path) -> None:
    staging = tmp_path / ".migblockd.sock.binding"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(staging))
    left.close()
    daemon = spawn_daemon(tmp_path, "--ephemeral")
    try:
        assert not os.path.lexists(staging)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(30)
        probe.connect(str(daemon.socket))
        assert probe.recv(4096).startswith(b'{"QMP"')
        probe.close()
    finally:
        assert daemon.stop() == 0
    # Something else by that name is no socket of a daemon's: left as it is, and
    # the socket bound by its own name.
    staging.write_text("not mine")
    again = spawn_daemon(tmp_path, "--ephemeral")
    assert again.stop() == 0
    assert staging.read_text() == "not mine"


def test_a_live_socket_at_the_staging_name_is_not_taken(tmp_path: Path) -> None:
    # Found by review: a daemon whose --socket (or --metrics) is another's staging
    # name had its live socket unlinked by the other's start, and lost its clients.
    staging = tmp_path / ".migblockd.sock.binding"
    first = spawn_daemon(tmp_path, "--ephemeral", socket=staging)
    second = spawn_daemon(tmp_path, "--ephemeral")
    try:
        for path in (staging, second.socket):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(30)
            probe.connect(str(path))  # the first: FileNotFoundError before the fix
            assert probe.recv(4096).startswith(b'{"QMP"')
            probe.close()
    finally:
        assert second.stop() == 0
        assert first.stop() == 0


def test_the_refusal_names_the_live_daemon(start_daemon: Callable[..., DaemonProcess]) -> None:
    live = start_daemon()
    second = start_daemon(wait=False)
    assert second.wait_exit() == 1
    assert (f"another migblockd (pid {live.proc.pid}) is already serving {live.socket}"
            in second.log()), second.log()
    assert live.stop() == 0
    # Stopped, it leaves the lock file (removing it would race) but not the socket,
    # and the next daemon starts.
    assert not live.socket.exists()
    assert live.socket.with_name(live.socket.name + ".lock").exists()
    again = start_daemon()
    assert again.stop() == 0


@contextlib.contextmanager
def stopping_slowly(live: DaemonProcess) -> Iterator[None]:
    """``live`` told to stop (SIGTERM) for the block, its drain kept going by a
    client that still sends: the drain waits until it closes, 30 s at most."""
    client = blocking_client(live.socket)
    sending = threading.Event()
    sending.set()

    def keep_sending() -> None:
        with contextlib.suppress(OSError):
            while sending.is_set():
                client.sendall(b'{"execute": "query-version"}')
                time.sleep(0.05)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        live.signal(signal.SIGTERM)
        live.wait_for_log("stopping: closing the socket and 1 client(s)")
        yield
    finally:
        sending.clear()
        sender.join()
        client.close()


def test_a_start_refused_while_the_first_daemon_stops_says_it_is_stopping(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    """A first daemon whose stop takes a while (its drain waits for a client that
    still sends, 30 s at most) holds its socket and state directory until it exits.
    Before, a second start on either was told the first was "already serving" it and
    to "stop it first", as though no stop had been asked."""
    state = tmp_path / "state"
    live = start_daemon("--state-dir", str(state))
    with stopping_slowly(live):
        same_socket = start_daemon(wait=False)
        assert same_socket.wait_exit() == 1, same_socket.log()
        same_state = start_daemon("--state-dir", str(state), socket=tmp_path / "other.sock",
                                  wait=False)
        assert same_state.wait_exit() == 1, same_state.log()
        assert live.proc.poll() is None, live.log()  # still stopping, the while
    assert live.wait_exit() == 0
    assert same_socket.log().rstrip("\n").endswith(
        f"ERROR: another migblockd (pid {live.proc.pid}) is stopping, and holds "
        f"{live.socket} until its stop is over (it drains its clients, 30 s at most); "
        "start again once it has exited, or choose another --socket"), same_socket.log()
    assert same_state.log().rstrip("\n").endswith(
        f"ERROR: state directory {state} is locked by another migblockd "
        f"(pid {live.proc.pid}), which is stopping; start again once it has exited, or "
        "use another --state-dir"), same_state.log()
    # The line goes with the daemon (the state directory's lock file keeps its note
    # alone, for the next holder): the next start takes it, and a start refused while
    # it runs is told it serves.
    assert not stopping_line(state / "lock")
    again = start_daemon("--state-dir", str(state))
    serving = start_daemon(wait=False)
    assert serving.wait_exit() == 1
    assert (f"another migblockd (pid {again.proc.pid}) is already serving {again.socket}"
            in serving.log()), serving.log()
    locked = start_daemon("--state-dir", str(state), socket=tmp_path / "other.sock",
                          wait=False)
    assert locked.wait_exit() == 1
    assert (f"state directory {state} is locked by another migblockd (pid "
            f"{again.proc.pid}); stop it, or use another --state-dir") in locked.log(), (
                locked.log())
    assert again.stop() == 0



def stopping_line(lock: Path) -> bool:
    """Whether the lock file's holder says it is stopping (its third line)."""
    lines = lock.read_bytes().split(b"\n")
    return len(lines) > 2 and lines[2] == b"stopping"


def test_a_stop_during_a_long_restore_is_said_in_the_locks_at_once(
    start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
) -> None:
    """Found by review of the stopping line: it was written by the event loop's stop
    handler, which a start installs once its restore is over.  A SIGTERM while a
    first daemon restored a big state (systemctl stop of a long start) left its locks
    saying nothing, and a second start refused its socket or its state directory
    meanwhile was told the first was "already serving" and to "stop it first"."""
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    preload(state, 100_000)
    first = start_daemon("--state-dir", str(state), socket=short_tmp / "a.sock", wait=False)
    lock = state / "lock"
    # The state directory's lock is taken just before the restore begins.
    while not lock.read_bytes().startswith(f"{first.proc.pid}\n".encode()):
        assert first.proc.poll() is None, first.log()
        time.sleep(0.001)
    first.signal(signal.SIGTERM)
    socket_lock = short_tmp / "a.sock.lock"
    while not (stopping_line(lock) and stopping_line(socket_lock)):
        # Said while it still restores, not once it gets to its end.
        assert first.proc.poll() is None, first.log()
        time.sleep(0.001)
    assert "restored" not in first.log(), first.log()
    first.signal(signal.SIGSTOP)  # held where it is, its locks with it, for the refusals
    try:
        same_state = start_daemon("--state-dir", str(state), socket=short_tmp / "b.sock",
                                  wait=False)
        assert same_state.wait_exit(30) == 1, same_state.log()
        same_socket = start_daemon(socket=short_tmp / "a.sock", wait=False)
        assert same_socket.wait_exit(30) == 1, same_socket.log()
    finally:
        first.signal(signal.SIGCONT)
    assert first.wait_exit(120) == 0, first.log()
    assert "received SIGTERM while starting: stopping before serving" in first.log()
    # Not the drain's "(it drains its clients, 30 s at most)": a daemon stopped before
    # it served has none, and what it still does is the rest of its start (found by
    # review of this test, which matched the socket's refusal up to that parenthesis).
    assert same_state.log().rstrip("\n").endswith(
        f"ERROR: state directory {state} is locked by another migblockd "
        f"(pid {first.proc.pid}), which is stopping before serving (a restore of its "
        "state under way is finished first, minutes for a large one); start again once "
        "it has exited, or use another --state-dir"), same_state.log()
    assert same_socket.log().rstrip("\n").endswith(
        f"ERROR: another migblockd (pid {first.proc.pid}) is stopping before serving, and "
        f"holds {short_tmp / 'a.sock'} until its start is over (no clients to drain; a "
        "restore of its state under way is finished first, minutes for a large one); "
        "start again once it has exited, or choose another --socket"), same_socket.log()
    # The next holder drops the line.
    again = start_daemon("--state-dir", str(state), socket=short_tmp / "a.sock")
    assert not stopping_line(lock) and not stopping_line(socket_lock)
    assert again.stop() == 0


def test_a_start_refused_the_metrics_socket_of_a_stopping_daemon_says_it_is_stopping(
    start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
) -> None:
    """Found by review of the stopping line: the socket's and the state directory's
    locks said it, the metrics socket's (--metrics PATH) not, so a second daemon that
    shares only that address was told the first "is already serving" it, and to "stop
    it first", while it drained."""
    endpoint = short_tmp / "metrics.sock"
    live = start_daemon("--metrics", str(endpoint), "--ephemeral", socket=short_tmp / "a.sock")
    with stopping_slowly(live):
        second = start_daemon("--metrics", str(endpoint), "--ephemeral",
                              socket=short_tmp / "b.sock", wait=False)
        assert second.wait_exit(30) == 1, second.log()
        assert live.proc.poll() is None, live.log()  # still stopping, the while
    assert live.wait_exit() == 0
    assert second.log().rstrip("\n").endswith(
        f"ERROR: another migblockd (pid {live.proc.pid}) is stopping, and holds "
        f"{endpoint} until its stop is over (it drains its clients, 30 s at most); "
        "start again once it has exited, or choose another --metrics"), second.log()


def test_a_stop_that_comes_as_a_shorter_note_is_written_leaves_the_lock_file_whole(
    tmp_path: Path,
) -> None:
    """Found by review of the stopping line said from the stop's signal handler, which
    runs between any two steps of the main thread.  Run between a note's cut of the
    lock file and the lock taking that note as its own, it wrote the note before with
    the line after it; the new note, shorter, written over that with the line, left
    the end of the old one behind (``PID\\nshort\\nstopping\\note than the next
    one...``).  A real SIGTERM, to the start's own handler (migblockd.early, set as
    migblockd.cli sets it), raised as the cut returns: the handler runs there."""
    path = tmp_path / "lock"
    code = f"""
        import os, signal, sys
        from pathlib import Path
        from migblockd.early import EarlySignals
        from migblockd.pidlock import PidLock, say_stopping
        early = EarlySignals()
        early.install()
        early.when_stopping(say_stopping)
        lock = PidLock.acquire(Path({str(path)!r}))
        lock.note("a note longer than the next one, written first")
        armed = True
        def at_the_cut(frame, event, arg):
            global armed
            if armed and event == "c_return" and arg is os.ftruncate:
                armed = False
                signal.raise_signal(signal.SIGTERM)
        sys.setprofile(at_the_cut)
        lock.note("short")
        sys.setprofile(None)
        assert early.stop() == "SIGTERM" and not armed
        # Ends holding it: the file stays as the stop left it.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 0, output
    # The start's stop: said as one before serving (PidLock.stopping).
    assert path.read_bytes() == f"{child.pid}\nshort\nstopping\nbefore serving\n".encode()


def vacant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migblockd.vacant", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def test_the_socket_units_check_refuses_only_what_answers_or_is_no_socket(
        tmp_path: Path) -> None:
    # The socket units' ExecStartPre=: systemd removes what is at ListenStream=.
    path = tmp_path / "s.sock"
    free = vacant(str(path))
    assert (free.returncode, free.stderr) == (0, "")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(os.fspath(path))  # closed unlistened: a crash's leftover
    stale = vacant(str(path))
    assert (stale.returncode, stale.stderr) == (0, "")
    assert path.exists()  # the check removes nothing: systemd replaces it
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(os.fspath(path))
        live.listen()
        refused = vacant(str(path))
    assert refused.returncode == 1
    assert refused.stderr == (f"migblockd: another daemon is already listening on {path}; "
                              "refusing to take over a live socket (stop it first, or "
                              "choose another ListenStream=)\n")
    path.unlink()
    path.write_text("mine\n")
    refused = vacant(str(path))
    assert (refused.returncode, refused.stderr) == (
        1, f"migblockd: {path} exists and is not a socket; refusing to replace it (move it "
           "away, or choose another ListenStream=)\n")
    assert vacant().stderr == "usage: python -m migblockd.vacant PATH\n"


def test_the_socket_units_checks_usage_is_an_error_in_the_journal(tmp_path: Path) -> None:
    # An ExecStartPre= edited wrong: journald took the unmarked line for info.
    journal = tmp_path / "journal"
    with journal.open("w") as stderr:
        st = os.fstat(stderr.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.run([sys.executable, "-m", "migblockd.vacant"], stderr=stderr,
                              env=env, timeout=30, check=False)
    assert proc.returncode == 1
    assert journal.read_text() == "<3>usage: python -m migblockd.vacant PATH\n"
