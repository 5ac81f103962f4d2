"""Sharing the socket without systemd: ``--socket-group``, the directory the daemon
creates, and the refused fallback directory.  The kernel's own permission checks
decide here: clients are other uids under ``setpriv``."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, assert_clean_log
from otheruids import Account, UidClient

from migblockd.startup import EXIT_NOTCONFIGURED

NOBODY = 65534


@pytest.fixture
def nobody(uid_client_script: Path) -> Iterator[Callable[..., UidClient]]:
    """``nobody(socket, groups=())``: a client as uid/gid 65534 with those groups only."""
    clients: list[UidClient] = []

    def make(socket: Path, groups: tuple[int, ...] = ()) -> UidClient:
        client = UidClient(uid_client_script, socket, NOBODY, NOBODY, groups)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_socket_group_lets_its_members_in_and_the_kernel_refuses_everyone_else(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        accounts: dict[str, Account], nobody: Callable[..., UidClient]) -> None:
    short_tmp.chmod(0o755)
    socket = short_tmp / "run" / "s.sock"  # the daemon creates run/
    daemon = start_daemon("--socket-mode", "0660", "--socket-group", "mbt-sock", socket=socket)
    gid = accounts["mbt-sock"].gid
    st, dir_st = os.lstat(socket), os.lstat(socket.parent)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    assert (stat.S_IMODE(dir_st.st_mode), dir_st.st_gid) == (0o710, gid)
    assert f"listening on {socket} (mode 0660, group mbt-sock)" in daemon.log()

    member = nobody(socket, groups=(gid,))
    assert member.ok("query-version")["package"].startswith("migblockd ")
    outsider = nobody(socket)
    assert outsider.connect_error == {"connect-error": "EACCES", "desc": "Permission denied"}
    # A member of another group is no better off.
    other = nobody(socket, groups=(accounts["mbt-admins"].gid,))
    assert other.connect_error is not None and other.connect_error["connect-error"] == "EACCES"
    assert member.ok("query-blockers") == []  # and the member is still served
    assert daemon.stop() == 0
    assert_clean_log(daemon)


@pytest.mark.parametrize("default", [f"u:{NOBODY}:rwx,g::x", "u::rwx,g::r-x,o::---"],
                         ids=["naming-a-user", "naming-no-one"])
def test_a_default_acl_of_the_directory_does_not_decide_who_connects(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        accounts: dict[str, Account], nobody: Callable[..., UidClient],
        uid_client_script: Path, default: str) -> None:
    """Found by review: a socket bound in a directory with a default ACL takes its
    entries in place of the umask.  The first let nobody (in no group) in and left
    the group's own entry without write; the second, naming no one, gives the socket
    no ACL of its own but still narrowed its mode to 0640.  Either way the socket
    group's members were refused, while the log said "mode 0660, group mbt-sock"."""
    short_tmp.chmod(0o755)
    run = short_tmp / "run"
    run.mkdir()
    gid = accounts["mbt-sock"].gid
    os.chown(run, 0, gid)
    run.chmod(0o711)
    subprocess.run(["setfacl", "-d", "-m", default, str(run)], check=True)
    socket = run / "s.sock"
    daemon = start_daemon("--socket-mode", "0660", "--socket-group", "mbt-sock", socket=socket)
    outsider = nobody(socket)
    assert outsider.connect_error is not None, "the default ACL let nobody in"
    assert outsider.connect_error["connect-error"] == "EACCES"
    alice = accounts["mbt-alice"]
    member = UidClient(uid_client_script, socket, alice.uid, alice.gid, (gid,))
    try:
        assert member.connect_error is None, "the default ACL kept the group out"
        assert member.ok("query-blockers") == []
    finally:
        member.close()
    with pytest.raises(OSError):
        os.getxattr(socket, "system.posix_acl_access", follow_symlinks=False)
    st = os.lstat(socket)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    assert (f"{socket} took the default ACL of its directory; the socket's mode (0660) "
            "alone decides who may connect") in daemon.log()
    assert daemon.stop() == 0
    assert_clean_log(daemon)


@pytest.mark.parametrize(("mode", "dir_mode"), [
    ("0600", 0o700), ("0660", 0o710), ("0666", 0o711), ("0606", 0o701),
    # Connecting takes write permission: a socket others may only read lets in nobody
    # more, and its directory was once made searchable for them all the same.
    ("0644", 0o700), ("0640", 0o700), ("0662", 0o711)],
    ids=["0600", "0660", "0666", "0606", "0644", "0640", "0662"])
def test_the_created_directory_lets_in_whom_the_socket_mode_lets_in(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        nobody: Callable[..., UidClient], mode: str, dir_mode: int) -> None:
    short_tmp.chmod(0o755)
    socket = short_tmp / "run" / "s.sock"
    start_daemon("--socket-mode", mode, socket=socket)
    assert stat.S_IMODE(os.lstat(socket.parent).st_mode) == dir_mode
    client = nobody(socket)
    if int(mode, 8) & 0o002:  # others may connect, so they can: once silently impossible
        assert client.ok("query-blockers") == []
    else:
        assert client.connect_error is not None
        assert client.connect_error["connect-error"] == "EACCES"


def test_an_existing_directory_that_keeps_the_group_out_is_named_at_start(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        accounts: dict[str, Account], nobody: Callable[..., UidClient]) -> None:
    """A directory that exists is left as it is: one a start with the default mode made
    (0700) keeps out the group members --socket-mode 0660 lets in.  The start and
    --check-config say so and what to run, rather than leave it to a client's
    "Permission denied"."""
    short_tmp.chmod(0o755)
    socket = short_tmp / "run" / "s.sock"
    socket.parent.mkdir(mode=0o700)  # as the README's first command, as root, leaves it
    args = ("--socket-mode", "0660", "--socket-group", "mbt-sock")
    gid = accounts["mbt-sock"].gid
    warning = (f"socket mode 0660 lets the members of group mbt-sock connect to {socket}, "
               f"but {socket.parent} is mode 0700, owner root, group root, which they may "
               f"not search, so they cannot connect; chgrp mbt-sock {socket.parent} and "
               f"chmod g+x {socket.parent} (or remove it: the daemon creates it searchable "
               "for them)")
    checked = subprocess.run([sys.executable, "-m", "migblockd", "--check-config",
                              "--socket", str(socket), *args],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0
    assert f"migblockd: {warning}\n" in checked.stderr
    daemon = start_daemon(*args, socket=socket)
    assert f"WARNING: {warning}\n" in daemon.log()
    member = nobody(socket, groups=(gid,))
    assert member.connect_error == {"connect-error": "EACCES", "desc": "Permission denied"}
    # What the warning says to run lets them in.
    os.chown(socket.parent, -1, gid)
    socket.parent.chmod(0o710)
    assert nobody(socket, groups=(gid,)).ok("query-version")["package"].startswith("migblockd ")
    # One above the socket's own is named too, with another --socket as the way out,
    # and so is every other on the way that keeps them out (run/, to every user).
    assert daemon.stop() == 0
    short_tmp.chmod(0o700)
    above = subprocess.run([sys.executable, "-m", "migblockd", "--check-config",
                            "--socket", str(socket), "--socket-mode", "0606"],
                           capture_output=True, text=True, timeout=60)
    assert above.stderr == (
        f"migblockd: socket mode 0606 lets every user connect to {socket}, but {short_tmp} "
        f"is mode 0700, owner root, group root, and {socket.parent} is mode 0710, owner "
        "root, group mbt-sock, which they may not search, so they cannot connect; chmod "
        f"o+x {short_tmp} and chmod o+x {socket.parent}, or choose a --socket outside "
        f"{short_tmp}\n")
    short_tmp.chmod(0o755)
    # A directory that lets them in, or a mode that lets nobody else in, is not named.
    for again in (args, ("--socket-mode", "0600")):
        quiet = subprocess.run([sys.executable, "-m", "migblockd", "--check-config",
                                "--socket", str(socket), *again],
                               capture_output=True, text=True, timeout=60)
        assert (quiet.returncode, quiet.stderr) == (0, "")


def test_a_directory_that_keeps_out_the_group_and_every_user_is_named_once(
        short_tmp: Path) -> None:
    """A 0666 socket (its group root's) in root's 0700 directory: the warning named the
    group's members and g+x, and after that the next start named every user and o+x."""
    short_tmp.chmod(0o755)
    socket = short_tmp / "run" / "s.sock"
    socket.parent.mkdir(mode=0o700)
    checked = subprocess.run([sys.executable, "-m", "migblockd", "--check-config",
                              "--socket", str(socket), "--socket-mode", "0666"],
                             capture_output=True, text=True, timeout=60)
    assert checked.stderr == (
        f"migblockd: socket mode 0666 lets every user connect to {socket}, but "
        f"{socket.parent} is mode 0700, owner root, group root, which they may not search, "
        f"so they cannot connect; chmod go+x {socket.parent} (or remove it: the daemon "
        "creates it searchable for them)\n")


def test_an_unknown_socket_group_stops_the_daemon_with_a_clear_message(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    daemon = start_daemon("--socket-group", "mbt-no-such-group", socket=short_tmp / "s.sock",
                          wait=False)
    assert daemon.wait_exit() == EXIT_NOTCONFIGURED
    assert "--socket-group: there is no group named 'mbt-no-such-group'" in daemon.log()
    assert not (short_tmp / "s.sock").exists()
    assert "Traceback" not in daemon.log()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv (to drop CAP_CHOWN)")
def test_a_group_the_daemon_may_not_give_leaves_no_directory_behind(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        accounts: dict[str, Account], nobody: Callable[..., UidClient]) -> None:
    """A daemon outside --socket-group (here root without CAP_CHOWN, which the kernel
    treats alike) is told so, and the directory it made is gone: left 0700, the next
    start would take it as it is and keep the group's members out."""
    short_tmp.chmod(0o755)
    socket = short_tmp / "run" / "s.sock"
    args = ["--ephemeral", "--socket-mode", "0660", "--socket-group", "mbt-sock"]
    refused = subprocess.run(["setpriv", "--bounding-set=-chown", sys.executable, "-m",
                              "migblockd", "--socket", str(socket), *args],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == EXIT_NOTCONFIGURED
    gid = accounts["mbt-sock"].gid
    # The group by the name it was given, and what to run.
    assert (f"cannot give {socket.parent} to group mbt-sock: Operation not permitted (the "
            "daemon's user, uid 0 (root), must be a member of the group: usermod -aG "
            "mbt-sock root, then start it again)") in refused.stderr
    assert not socket.parent.exists()
    start_daemon(*args, socket=socket)
    assert stat.S_IMODE(os.lstat(socket.parent).st_mode) == 0o710
    assert nobody(socket, groups=(gid,)).ok("query-version")["package"].startswith("migblockd ")


def _fallback(tmpdir: Path) -> Path:
    """The daemon's fallback directory under TMPDIR=tmpdir (it runs as root: uid 0)."""
    return tmpdir / f"migblockd-{os.geteuid()}"


def _owned_by_nobody(d: Path) -> None:
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)


def _writable(mode: int) -> Callable[[Path], None]:
    def prepare(d: Path) -> None:
        d.mkdir()
        d.chmod(mode)
    return prepare


def _acl(entries: str) -> Callable[[Path], None]:
    def prepare(d: Path) -> None:
        d.mkdir(mode=0o700)
        subprocess.run(["setfacl", "-m", entries, str(d)], check=True)
    return prepare


def _symlink(d: Path) -> None:
    d.with_name("elsewhere").mkdir(mode=0o700)
    d.symlink_to("elsewhere")


@pytest.mark.parametrize(("prepare", "problem"), [
    (_owned_by_nobody, f"it belongs to uid {NOBODY} (nobody), not to the daemon's uid "
                       f"{os.geteuid()} ({pwd.getpwuid(os.geteuid()).pw_name})"),
    (_writable(0o777), "other users may write to it (mode 0777)"),
    (_writable(0o770), "other users may write to it (mode 0770)"),
    (_acl(f"u:{NOBODY}:rwx"), f"its ACL lets uid {NOBODY} (nobody) write to it (mode 0770, "
                              "whose group bits are the ACL's mask)"),
    (_symlink, "it is not a directory"),
], ids=["other-owner", "world-writable", "group-writable", "acl-lets-another-user-write",
        "symlink"])
def test_an_unsafe_fallback_directory_is_refused(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
        prepare: Callable[[Path], None], problem: str) -> None:
    tmpdir = short_tmp / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)  # a shared temporary directory, as /tmp is
    directory = _fallback(tmpdir)
    prepare(directory)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {
        "TMPDIR": str(tmpdir)}
    daemon = start_daemon(socket=directory / "migblockd.sock", env=env, wait=False)
    assert daemon.wait_exit() == EXIT_NOTCONFIGURED
    # Run as root, which may remove any of them.
    assert (f"refusing to put the socket in {directory}: {problem}, so another user could "
            "replace the socket; remove it, or set XDG_RUNTIME_DIR, or choose another "
            "--socket\n") in daemon.log(), daemon.log()
    assert not (directory / "migblockd.sock").exists()
    assert "Traceback" not in daemon.log()


def test_a_safe_fallback_directory_is_used(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    tmpdir = short_tmp / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {
        "TMPDIR": str(tmpdir)}
    first = start_daemon(socket=_fallback(tmpdir) / "migblockd.sock", env=env)  # creates it
    assert stat.S_IMODE(os.lstat(_fallback(tmpdir)).st_mode) == 0o700
    assert first.stop() == 0
    second = start_daemon(socket=_fallback(tmpdir) / "migblockd.sock", env=env)  # reuses it
    assert second.stop() == 0
    assert os.lstat(_fallback(tmpdir)).st_uid == os.geteuid()


def test_a_fallback_directory_whose_acl_lets_only_its_user_write_is_used(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    """Found by review of the directories' ACL rule: under an access ACL the mode's
    group bits are only its mask, and a 0700 fallback directory that ``setfacl -m
    u:65534:rx,m::rwx`` made 0770, which nobody but its user may write, was refused
    as "other users may write to it (mode 0770)", by the daemon and by the clients.
    Its entries decide, as the kernel reads them.  Real setfacl, the daemon and the
    shell as processes."""
    tmpdir = short_tmp / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)
    directory = _fallback(tmpdir)
    _acl(f"u:{NOBODY}:rx,m::rwx")(directory)
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o770  # the mask's bits
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {
        "TMPDIR": str(tmpdir)}
    sock = directory / "migblockd.sock"
    daemon = start_daemon("--ephemeral", socket=sock, env=env)

    def shell() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "migblockd.shell", str(sock), "-c",
                               "query-version"], env=env, capture_output=True, text=True,
                              timeout=60)

    served = shell()
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout)["return"]["package"].startswith("migblockd ")
    # An entry that lets another user write is refused, by the clients too.
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rwx", str(directory)], check=True)
    refused = shell()
    assert refused.returncode == 2
    assert (f"refusing {directory}: its ACL lets uid {NOBODY} (nobody) write to it (mode "
            "0770, whose group bits are the ACL's mask), so another user's program could be "
            "listening there") in refused.stderr, refused.stderr
    assert daemon.stop() == 0


CLIENT = """
import asyncio
from migblockd.client import ClientError, MigblockClient

async def main() -> None:
    try:
        async with MigblockClient() as client:
            print("added", (await client.add_blocker("caught")).id)
    except ClientError as exc:
        print(exc)

asyncio.run(main())
"""


def test_the_clients_do_not_connect_through_a_fallback_directory_another_user_made(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path,
        accounts: dict[str, Account]) -> None:
    """Without XDG_RUNTIME_DIR, a user's shell and client connect to
    ${TMPDIR:-/tmp}/migblockd-UID/migblockd.sock, where another user may run a daemon
    first, in a directory of theirs, and catch the commands: before, the user's blocker
    went to that daemon.  The clients judge the directory as the user's own daemon does."""
    alice, bob = accounts["mbt-alice"], accounts["mbt-bob"]
    short_tmp.chmod(0o755)
    tmpdir = short_tmp / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)  # a shared temporary directory, as /tmp is
    directory = tmpdir / f"migblockd-{alice.uid}"
    sock = directory / "migblockd.sock"
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmpdir)}  # no XDG_RUNTIME_DIR

    def as_uid(who: Account) -> str:
        wrapper = tmp_path / f"python-as-{who.name}"
        wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid={who.uid} --regid={who.gid} "
                           f"--clear-groups {sys.executable} \"$@\"\n")
        wrapper.chmod(0o755)
        return str(wrapper)

    def alice_runs(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([as_uid(alice), *argv], env=env, capture_output=True,
                              text=True, timeout=60, cwd="/")

    # bob's daemon, open to every user, where alice's default socket is: its
    # directory is bob's, 0711.
    impostor = start_daemon("--ephemeral", "--socket-mode", "0666", socket=sock, env=env,
                            python=as_uid(bob))
    assert os.lstat(directory).st_uid == bob.uid
    problem = (f"refusing {directory}: it belongs to uid {bob.uid} (mbt-bob), not to your "
               f"uid {alice.uid} (mbt-alice), so another user's program could be listening "
               f"there in place of your daemon; ask uid {bob.uid} (mbt-bob) or root to "
               "remove it, or use a socket outside it: ")
    shell = alice_runs("-m", "migblockd.shell", "-c", "add-blocker reason=caught")
    assert (shell.returncode, shell.stdout) == (2, ""), shell
    assert shell.stderr == (f"migblock-shell: cannot connect to {sock}: {problem}give its "
                            "path (migblock-shell SOCKET), or set XDG_RUNTIME_DIR (for the "
                            "default one)\n")
    # Named on the command line, the same socket is refused in the same words:
    # "give the daemon's socket" would have asked for what was just given
    # (found by review).
    named = alice_runs("-m", "migblockd.shell", str(sock), "-c", "add-blocker reason=caught")
    assert (named.returncode, named.stderr) == (2, shell.stderr), named
    client = alice_runs("-c", CLIENT)
    assert client.returncode == 0, client.stderr
    assert client.stdout == (f"cannot connect to migblockd at {sock}: {problem}pass its "
                             "path as MigblockClient's path, or set XDG_RUNTIME_DIR (for the "
                             "default one)\n")
    assert impostor.received() == [], impostor.received()
    assert impostor.stop() == 0

    # alice's own daemon refuses the directory for the same reason, in its words.
    refused = start_daemon("--ephemeral", socket=sock, env=env, python=as_uid(alice),
                           wait=False)
    assert refused.wait_exit() == EXIT_NOTCONFIGURED
    # The sticky directory lets only bob and root remove his directory: the advice says so.
    assert (f"refusing to put the socket in {directory}: it belongs to uid {bob.uid} "
            f"(mbt-bob), not to the daemon's uid {alice.uid} (mbt-alice), so another user "
            f"could replace the socket; ask uid {bob.uid} (mbt-bob) or root to remove it, or "
            "set XDG_RUNTIME_DIR, or choose another --socket\n") in refused.log()

    # Made by alice's daemon, the directory is hers: her shell uses it, by default.
    shutil.rmtree(directory)
    own = start_daemon("--ephemeral", socket=sock, env=env, python=as_uid(alice))
    shell = alice_runs("-m", "migblockd.shell", "-c", "add-blocker reason=mine id=mine")
    assert shell.returncode == 0, shell.stderr
    assert [b["id"] for b in json.loads(alice_runs(
        "-m", "migblockd.shell", "-c", "query-blockers").stdout)["return"]] == ["mine"]
    # ...until others may write to it: then neither connects, nor would a new daemon.
    directory.chmod(0o777)
    shell = alice_runs("-m", "migblockd.shell", "-c", "query-blockers")
    assert shell.returncode == 2
    assert (f"refusing {directory}: other users may write to it (mode 0777), so another "
            "user's program could be listening there") in shell.stderr, shell.stderr
    assert own.stop() == 0


def test_a_fallback_directory_root_made_is_roots_to_remove(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path, tmp_path: Path,
        accounts: dict[str, Account]) -> None:
    """The advice named root twice: "ask uid 0 (root) or root to remove it"."""
    alice = accounts["mbt-alice"]
    short_tmp.chmod(0o755)
    tmpdir = short_tmp / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)
    directory = tmpdir / f"migblockd-{alice.uid}"
    directory.mkdir(mode=0o700)  # root's: this test runs as root
    wrapper = tmp_path / "python-as-alice"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid={alice.uid} --regid={alice.gid} "
                       f"--clear-groups {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmpdir)}  # no XDG_RUNTIME_DIR
    shell = subprocess.run([str(wrapper), "-m", "migblockd.shell", "-c", "query-version"],
                           env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert shell.returncode == 2
    assert (f"refusing {directory}: it belongs to uid 0 (root), not to your uid {alice.uid} "
            "(mbt-alice), so another user's program could be listening there in place of "
            "your daemon; ask root to remove it, or use a socket outside it: give its "
            "path (migblock-shell SOCKET), or set XDG_RUNTIME_DIR (for the default one)\n"
            ) in shell.stderr, shell.stderr
    refused = start_daemon("--ephemeral", socket=directory / "migblockd.sock", env=env,
                           python=str(wrapper), wait=False)
    assert refused.wait_exit() == EXIT_NOTCONFIGURED
    assert "could replace the socket; ask root to remove it, or set XDG_RUNTIME_DIR" \
        in refused.log(), refused.log()
