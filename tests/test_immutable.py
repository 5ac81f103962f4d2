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
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def assert_refused(args: list[str], message: str, *, checked: bool = True) -> None:
    """The start (and ``--check-config``, when ``checked``) refuse in these words."""
    started = migblockd(*args)
    assert started.returncode == 1
    assert f"ERROR: {message}\n" in started.stderr, started.stderr
    assert "Traceback" not in started.stderr
    if checked:
        check = migblockd("--check-config", *args)
        assert (check.returncode, check.stderr) == (1, f"migblockd: {message}\n")


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


def test_a_stale_socket_in_an_append_only_directory(short_tmp: Path,
                                                    marked: list[Path]) -> None:
    run = short_tmp / "run"
    run.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(run / "q.sock"))
    (run / "q.sock.lock").touch()
    chattr(marked, "+a", run)
    # Only binding tells that the socket is stale: the check leaves it to the start.
    assert_refused(["--ephemeral", "--socket", str(run / "q.sock")],
                   f"cannot remove the stale socket {run}/q.sock: Operation not permitted; "
                   f"{fix(run, '--socket', 'a')}", checked=False)


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
    made = subprocess.run([sys.executable, "-c",
                           "import sys; from pathlib import Path; "
                           "from migblockd.state import Store; "
                           "Store.open(Path(sys.argv[1]), restore=lambda s: None).close()",
                           str(state)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    database = state / "state.db"
    chattr(marked, "+i", database)
    # The check opens no database: the start says it.
    assert_refused(args, f"cannot read and write {database}: Operation not permitted; "
                         f"{fix(database, '--state-dir')}", checked=False)
