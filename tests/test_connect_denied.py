"""What a client is told when it cannot connect: which file refuses it and what would
let it in.  The clients are other uids under ``setpriv``, refused by the kernel itself,
and run ``migblockd.paths.connect_failure`` as ``migblock-shell`` and
``migblockd.client`` do."""

from __future__ import annotations

import grp
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from otheruids import Account, client_python

import migblockd
from migblockd.paths import connect_failure

CHECKOUT = Path(migblockd.__file__).resolve().parent

#: Run as another uid: connect to argv[1], print what connect_failure says.  argv[2],
#: when given, stands for /run/migblockd/migblockd.sock (the systemd units' socket).
PROBE = """
import socket, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from migblockd import paths
if sys.argv[2]:
    paths.SYSTEM_SOCKET = Path(sys.argv[2])
path = sys.argv[1] or str(paths.default_socket_path())
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(path)
except OSError as err:
    print(paths.connect_failure(path, err))
else:
    print("connected")
"""


@pytest.fixture(scope="module")
def package() -> Iterator[Path]:
    """The modules the probe imports, copied where every uid can read them."""
    where = Path(tempfile.mkdtemp(prefix="migblockd-denied-", dir="/tmp"))
    where.chmod(0o755)
    (where / "migblockd").mkdir(mode=0o755)
    for name in ("__init__.py", "paths.py", "denied.py"):
        shutil.copyfile(CHECKOUT / name, where / "migblockd" / name)
        (where / "migblockd" / name).chmod(0o644)
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every uid may search, as /run is."""
    where = Path(tempfile.mkdtemp(prefix="migblockd-denied-", dir="/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def probe(package: Path, who: Account, path: str, *, groups: tuple[int, ...] = (),
          system: str = "") -> str:
    drop = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    proc = subprocess.run(
        ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", drop, "env", "-i",
         client_python(), "-I", "-c", PROBE, path, system, str(package)],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def listening(path: Path, mode: int, gid: int) -> socket.socket:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    os.chown(path, 0, gid)
    path.chmod(mode)
    return server


def test_a_directory_of_a_group_the_user_is_not_in_is_named_with_the_fix(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    # The systemd units' layout: 0750 root:GROUP directory, 0660 socket.
    group = "mbt-admins"
    gid = accounts[group].gid
    run = shared / "run"
    run.mkdir()
    os.chown(run, 0, gid)
    run.chmod(0o750)
    with listening(run / "migblockd.sock", 0o660, gid):
        alice = accounts["mbt-alice"]
        told = probe(package, alice, str(run / "migblockd.sock"))
        assert told == (
            f"Permission denied: {run} is mode 0750, owner root, group {group}, and uid "
            f"{alice.uid} (mbt-alice) is not in group {group}: add mbt-alice to it "
            f"('usermod -aG {group} mbt-alice'), then log in again")

        # carol is in the group in /etc/group, but a session from before usermod -aG
        # (here: a process without the group) is refused all the same.
        carol = accounts["mbt-carol"]
        assert carol.name in grp.getgrgid(gid).gr_mem
        told = probe(package, carol, str(run / "migblockd.sock"))
        assert told == (
            f"Permission denied: {run} is mode 0750, owner root, group {group}; uid "
            f"{carol.uid} (mbt-carol) is in group {group}, but this process is not: log "
            f"in again (or run 'newgrp {group}') since being added to it")

        # With the group, it connects.
        assert probe(package, carol, str(run / "migblockd.sock"), groups=(gid,)) == "connected"


def test_a_socket_its_mode_closes_says_which_settings_open_it(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    gid = accounts["mbt-sock"].gid
    with listening(shared / "s.sock", 0o600, gid):
        alice = accounts["mbt-alice"]
        told = probe(package, alice, str(shared / "s.sock"), groups=(gid,))
    assert told == (
        f"Permission denied: {shared}/s.sock is mode 0600, owner root, group mbt-sock, which "
        f"does not let uid {alice.uid} (mbt-alice) connect to it; the daemon's --socket-mode "
        "and --socket-group (the socket unit's SocketMode= and SocketGroup=) decide who may "
        "connect")


def test_a_user_without_a_daemon_of_their_own_is_told_where_the_units_one_is(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    # A user's default socket is their own daemon's; under the systemd units the daemon
    # is the system's.
    system = shared / "run" / "migblockd.sock"
    alice = accounts["mbt-alice"]
    told = probe(package, alice, "", system=str(system))
    assert told == "No such file or directory"  # no system daemon here either
    system.parent.mkdir()
    told = probe(package, alice, "", system=str(system))
    assert told == ("No such file or directory (this user's default socket; the daemon of "
                    f"the systemd units listens on {system}: give that path)")
    # A path the user gave is theirs to get right.
    assert probe(package, alice, str(shared / "x.sock"), system=str(system)) == (
        "No such file or directory")


def test_a_refusal_no_mode_explains_keeps_the_general_hint(shared: Path) -> None:
    # Root's own socket, reached by root: every mode allows it (a security module would
    # have refused), so the general hint stays.
    with listening(shared / "s.sock", 0o600, 0):
        told = connect_failure(str(shared / "s.sock"), PermissionError(13, "Permission denied"))
    assert told == ("Permission denied (the daemon's socket is mode 0600 by default: run as "
                    "its user, or see its --socket-mode and --socket-group)")


def test_a_directory_no_group_of_the_user_may_search_says_who_can_open_it(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    # A 0700 directory on the way (a --socket under a private directory): joining its
    # group would not help.  It used to end at "which does not let uid N search it".
    gid = accounts["mbt-admins"].gid
    private = shared / "private"
    private.mkdir()
    os.chown(private, 0, gid)
    private.chmod(0o700)
    (private / "run").mkdir(mode=0o755)
    alice = accounts["mbt-alice"]
    with listening(private / "run" / "migblockd.sock", 0o666, gid):
        path = str(private / "run" / "migblockd.sock")
        told = probe(package, alice, path)
        assert told == (
            f"Permission denied: {private} is mode 0700, owner root, group mbt-admins, which "
            f"does not let uid {alice.uid} (mbt-alice) search it: run as a user it lets in, "
            f"or have root open it to a group of this user's ('chgrp GROUP {private}' and "
            f"'chmod g+x {private}'), or start the daemon with a --socket outside it")
        # In the directory's group, which may not search it either.
        told = probe(package, alice, path, groups=(gid,))
        assert told == (
            f"Permission denied: {private} is mode 0700, owner root, group mbt-admins, which "
            f"does not let uid {alice.uid} (mbt-alice) search it: run as a user it lets in, "
            f"or have root open it to its group ('chmod g+x {private}'), or start the daemon "
            "with a --socket outside it")
        # Its owner, who took its own search permission away.
        os.chown(private, alice.uid, gid)
        private.chmod(0o600)
        told = probe(package, alice, path)
        assert told == (
            f"Permission denied: {private} is mode 0600, owner mbt-alice, group mbt-admins, "
            f"which does not let uid {alice.uid} (mbt-alice) search it: as its owner, run "
            f"'chmod u+x {private}'")
        # Open to its group, it lets a member in.
        os.chown(private, 0, gid)
        private.chmod(0o710)
        assert probe(package, alice, path, groups=(gid,)) == "connected"


def test_a_path_that_is_not_a_socket_is_named_so_whatever_its_mode(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    # The kernel refuses a path the user may not write before it finds it is no socket:
    # the state directory given for the socket was blamed on the socket's permissions.
    (shared / "state").mkdir(mode=0o700)
    (shared / "migblockd.toml").touch(mode=0o600)
    alice = accounts["mbt-alice"]
    assert probe(package, alice, str(shared / "state")) == "not a socket (a directory)"
    assert probe(package, alice, str(shared / "migblockd.toml")) == (
        "not a socket (a regular file)")
    (shared / "open.toml").touch(mode=0o666)  # the case ECONNREFUSED always told
    assert probe(package, alice, str(shared / "open.toml")) == "not a socket (a regular file)"
