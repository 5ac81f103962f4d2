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
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from otheruids import Account, client_python

import migblockd
from migblockd.denied import kept_out
from migblockd.paths import connect_failure

CHECKOUT = Path(migblockd.__file__).resolve().parent
HERE = Path(__file__).resolve().parent

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
    for name in ("__init__.py", "paths.py", "denied.py", "trust.py", "acl.py", "userns.py"):
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
          system: str = "", through: tuple[str, ...] = ()) -> str:
    """What ``who`` is told (``through``: what runs the probe, as ``unshare``)."""
    drop = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    proc = subprocess.run(
        ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", drop, *through, "env", "-i",
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


def test_root_of_a_user_namespace_is_told_it_is_its_user_outside(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    # Reproduced first: alice as root of a user namespace of her own was taken for the
    # host's root, whom every mode lets through, and was told only the general hint
    # (the socket is mode 0600 by default: run as its user), as if no mode refused her.
    group = "mbt-admins"
    gid = accounts[group].gid
    run = shared / "run"
    run.mkdir()
    os.chown(run, 0, gid)
    run.chmod(0o750)
    alice = accounts["mbt-alice"]
    inside = ("unshare", "--user", "--map-root-user")
    path = str(run / "migblockd.sock")
    with listening(run / "migblockd.sock", 0o660, gid):
        told = probe(package, alice, path, through=inside)
        assert told == (
            f"Permission denied: {run} is mode 0750, its owner and group not both mapped into "
            "this process's user namespace, whose root this process is only: the kernel "
            f"judges it as uid {alice.uid} outside the namespace (root of a user namespace "
            "has no power over a file it does not map, user_namespaces(7)), and the mode "
            "does not let others search it; connect from outside the namespace as a user "
            f"the socket lets in (there the client names what refuses uid {alice.uid} and "
            "what would let it in)")
        # Outside, the same user is told which group lets her in.
        assert probe(package, alice, path).startswith(
            f"Permission denied: {run} is mode 0750, owner root, group {group}, and uid "
            f"{alice.uid} (mbt-alice) is not in group {group}: ")
    # Over a file the namespace maps (alice's, her uid and gid are its root's), its
    # root's power is real: a directory of hers she may not search lets it through, and
    # the socket in it that is not hers is what refuses.
    mine = shared / "mine"
    mine.mkdir()
    os.chown(mine, alice.uid, alice.gid)
    with listening(mine / "s.sock", 0o660, gid), listening(mine / "own.sock", 0o600, gid):
        os.chown(mine / "own.sock", alice.uid, alice.gid)
        mine.chmod(0o000)
        assert probe(package, alice, str(mine / "own.sock"), through=inside) == "connected"
        assert probe(package, alice, str(mine / "own.sock")).startswith(
            f"Permission denied: {mine} is mode 0000, owner mbt-alice, ")
        told = probe(package, alice, str(mine / "s.sock"), through=inside)
    assert told.startswith(f"Permission denied: {mine}/s.sock is mode 0660, its owner and "
                           "group not both mapped into this process's user namespace, "), told
    assert "the mode does not let others connect to it; " in told


def test_a_member_of_a_mapped_group_is_judged_by_its_bits_in_a_user_namespace(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    # Found by review: in a user namespace that maps the client's uid and a directory's
    # group but not its owner, a member of that group was judged by the others' bits:
    # a 0750 directory the kernel let it search was named as what refused it (the
    # socket in it did), and a 0705 one that refused it was not named at all.
    alice, group = accounts["mbt-alice"], accounts["mbt-admins"].gid
    run = shared / "run"
    run.mkdir()
    os.chown(run, accounts["mbt-bob"].uid, group)  # an owner the namespace does not map
    uids = f"0 0 1,{alice.uid} {alice.uid} 1"
    gids = f"0 0 1,{alice.gid} {alice.gid} 1,{group} {group} 1"
    # Root of the namespace (the host's, mapped) becomes alice in it, in the group.
    inside = [sys.executable, str(HERE / "userns_exec.py"), uids, gids, "/usr/bin/setpriv",
              f"--reuid={alice.uid}", f"--regid={alice.gid}", f"--groups={group}", "env",
              "-i", client_python(), "-I", "-c", PROBE, str(run / "s.sock"), "", str(package)]

    def told() -> str:
        proc = subprocess.run(inside, capture_output=True, text=True, timeout=60, cwd="/")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    with listening(run / "s.sock", 0o600, 0):
        run.chmod(0o750)
        assert told().startswith(f"Permission denied: {run}/s.sock is mode 0600, owner root, "
                                 "group root, which does not let uid "), told()
        run.chmod(0o705)  # the others may search it, the group may not: nor may alice
        assert told() == (
            f"Permission denied: {run} is mode 0705, its owner and group not both mapped "
            f"into this process's user namespace, where this process is uid {alice.uid}: "
            f"the kernel judges it as uid {alice.uid} outside the namespace (root of a "
            "user namespace has no power over a file it does not map, user_namespaces(7)), "
            f"and the mode does not let its group, gid {group}, which this process is in, "
            "search it; connect from outside the namespace as a user the socket lets in "
            f"(there the client names what refuses uid {alice.uid} and what would let it in)")
        os.chown(run / "s.sock", alice.uid, alice.gid)
        run.chmod(0o750)
        assert told() == "connected"  # so the group's bits are what the kernel went by


def test_a_directory_of_group_root_is_not_fixed_by_joining_root(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    # Reproduced first: the units' /run/migblockd made by systemd's DirectoryMode=0750
    # without the tmpfiles.d line is root:root, and a client was told to join group
    # root ('usermod -aG root mbt-alice'), which gives far more than this socket.
    run = shared / "run"
    run.mkdir()
    run.chmod(0o750)
    gid = accounts["mbt-sock"].gid
    with listening(run / "migblockd.sock", 0o660, gid):
        alice = accounts["mbt-alice"]
        told = probe(package, alice, str(run / "migblockd.sock"), groups=(gid,))
        assert "usermod" not in told and "newgrp" not in told
        assert told == (
            f"Permission denied: {run} is mode 0750, owner root, group root, which does not "
            f"let uid {alice.uid} (mbt-alice) search it: run as a user it lets in, or have "
            f"root open it to a group of this user's ('chgrp GROUP {run}'), or start the "
            "daemon with a --socket outside it")  # 0750: g+x is there already
        # The units' directory is made anew at each boot: the lasting fix is said too.
        told = probe(package, alice, str(run / "migblockd.sock"), groups=(gid,),
                     system=str(run / "migblockd.sock"))
        assert told.endswith(
            f"('chgrp GROUP {run}') (and, to keep it so after a reboot, install the "
            f"tmpfiles.d line migblockd ships: 'd {run} 0750 root migblockd-clients -'), or "
            "start the daemon with a --socket outside it"), told
    # The socket itself of group root: its settings, not the group, are the way in.
    with listening(shared / "s.sock", 0o660, 0):
        told = probe(package, alice, str(shared / "s.sock"))
    assert told == (
        f"Permission denied: {shared}/s.sock is mode 0660, owner root, group root, which "
        f"does not let uid {alice.uid} (mbt-alice) connect to it; the daemon's --socket-mode "
        "and --socket-group (the socket unit's SocketMode= and SocketGroup=) decide who may "
        "connect")


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
    # No system daemon here either: how to start one of their own.
    assert told == "No such file or directory (no daemon listens there: start one with migblockd)"
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


@pytest.mark.parametrize("where", ["own", "above", "both"])
@pytest.mark.parametrize("group", ["socket", "other"])
@pytest.mark.parametrize("dir_mode", [0o700, 0o701, 0o710, 0o711], ids=oct)
@pytest.mark.parametrize("mode", [0o660, 0o666, 0o606], ids=oct)
def test_the_warning_of_a_directory_that_keeps_them_out_is_followed_once(
    package: Path, shared: Path, accounts: dict[str, Account], mode: int, dir_mode: int,
    group: str, where: str
) -> None:
    """The start's warning (denied.kept_out) names everyone the socket's mode lets in
    that an existing directory keeps out, and what it names to run lets them all in.
    It named the group's members alone for a 0666 socket in a root:root 0700
    directory, whose g+x left every other user out until the next start said so."""
    gid = accounts["mbt-sock"].gid
    dir_gid = gid if group == "socket" else accounts["mbt-admins"].gid
    above = shared / "up"
    own = above / "run"
    own.mkdir(parents=True)
    for directory, at in ((above, "above"), (own, "own")):
        if where in (at, "both"):
            os.chown(directory, 0, dir_gid)
            directory.chmod(dir_mode)
        else:
            directory.chmod(0o711)
    path = own / "s.sock"
    alice = accounts["mbt-alice"]  # owns none of the directories
    let_in = {whom: groups for whom, bit, groups in (("members", 0o020, (gid,)),
                                                     ("others", 0o002, ())) if mode & bit}
    with listening(path, mode, gid):
        refused = {whom for whom, groups in let_in.items()
                   if probe(package, alice, str(path), groups=groups) != "connected"}
        warning = kept_out(path, mode, gid)
        if not refused:
            assert warning is None
            return
        assert warning is not None
        if refused == {"members", "others"}:
            whom = "every user"
        elif refused == {"members"}:
            whom = "the members of group mbt-sock"
        else:
            whom = "every user outside group mbt-sock" if "members" in let_in else "every user"
        assert warning.startswith(f"socket mode {mode:04o} lets {whom} connect to {path}, "
                                  "but "), warning
        _, fix = warning.split(", which they may not search, so they cannot connect; ")
        if where == "own":
            fix = fix.removesuffix(" (or remove it: the daemon creates it searchable for them)")
        else:
            fix = fix.removesuffix(f", or choose a --socket outside "
                                   f"{'it' if where == 'above' else above}")
        assert "(or" not in fix and ", or" not in fix, warning
        subprocess.run(fix.replace(" and ", " && "), shell=True, check=True)
        for whom, groups in let_in.items():
            assert probe(package, alice, str(path), groups=groups) == "connected", (whom, warning)
        assert kept_out(path, mode, gid) is None


@pytest.mark.parametrize("mode", [0o660, 0o666], ids=oct)
@pytest.mark.parametrize("acl", [
    # Another group's entry: chgrp and chmod g+x left the group's own entry closed.
    ("root", 0o700, "g:mbt-admins:rx"),
    # The mode says 0750 (the mask), but the group's own entry lets no one through.
    ("mbt-sock", 0o750, "g::-,g:mbt-admins:rx"),
    # An entry of the socket's group's own, without search: the others' bits no
    # longer count for its members.
    ("root", 0o711, "g:mbt-sock:r"),
    # Found by review: a named entry the mask keeps from writing.  A setfacl -m
    # that recomputes the mask (the union of the entries) let bob write there.
    ("root", 0o750, "u:mbt-bob:rwx,m::rx"),
], ids=["other-group", "own-entry-closed", "named-entry-closed", "masked-user"])
def test_a_directory_with_an_acl_is_judged_by_its_entries(
    package: Path, shared: Path, accounts: dict[str, Account], mode: int,
    acl: tuple[str, int, str]
) -> None:
    """Found by review: under an access ACL the mode's group bits are the mask, so
    the start's warning missed a directory that kept the group out, or named a
    ``chmod g+x`` that changed only the mask.  The kernel refuses here, and the
    warning's fix, run as it is written, lets everyone in."""
    owner_group, dir_mode, entries = acl
    gid = accounts["mbt-sock"].gid
    own = shared / "run"
    own.mkdir()
    os.chown(own, 0, grp.getgrnam(owner_group).gr_gid)
    own.chmod(dir_mode)
    subprocess.run(["setfacl", "-m", entries, str(own)], check=True)
    path = own / "s.sock"
    alice = accounts["mbt-alice"]
    with listening(path, mode, gid):
        refusal = probe(package, alice, str(path), groups=(gid,))
        assert refusal != "connected"  # the kernel keeps the group's members out
        assert f"{own} is mode " in refusal and ", with an ACL, " in refusal, refusal
        assert "setfacl -m g:GROUP:x" in refusal or "usermod" in refusal, refusal
        warning = kept_out(path, mode, gid)
        assert warning is not None
        assert "with an ACL" in warning, warning
        _, fix = warning.split(", which they may not search, so they cannot connect; ")
        fix = fix.removesuffix(" (or remove it: the daemon creates it searchable for them)")
        assert "chmod g+x" not in fix, warning
        mask = own.stat().st_mode & 0o070
        subprocess.run(fix.replace(" and ", " && "), shell=True, check=True)
        assert probe(package, alice, str(path), groups=(gid,)) == "connected", warning
        # Only the search was added for the rest: the mask gained it alone, so
        # no named entry may now write there (replace the socket), and the
        # daemon's next start still finds a directory others may not write.
        assert own.stat().st_mode & 0o070 == mask | 0o010, warning
        bob = accounts["mbt-bob"]
        wrote = subprocess.run(["setpriv", f"--reuid={bob.uid}", f"--regid={bob.gid}",
                                "--clear-groups", "touch", str(own / "bob")],
                               capture_output=True, timeout=60, cwd="/")
        assert wrote.returncode != 0 and not (own / "bob").exists(), warning
        if mode & 0o002:
            assert probe(package, alice, str(path)) == "connected", warning
        assert kept_out(path, mode, gid) is None


def test_under_an_acl_the_entry_that_decides_is_the_one_named(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    """Found by review: a refused client was told to join the directory's own group,
    whatever its ACL said: alice, whose own entry keeps her out (and whom no group
    can let in), dave, whom the entry of the socket's group would let in, and carol,
    in that group's database but not in this process, who only had to log in again."""
    sock, admins = accounts["mbt-sock"].gid, accounts["mbt-admins"].gid
    run = shared / "run"
    run.mkdir()
    run.chmod(0o750)
    subprocess.run(["setfacl", "-m", "u:mbt-alice:r,g:mbt-sock:rx,g:mbt-admins:x", str(run)],
                   check=True)
    path = run / "s.sock"
    alice, carol, dave = accounts["mbt-alice"], accounts["mbt-carol"], accounts["mbt-dave"]
    with listening(path, 0o666, sock):
        told = probe(package, alice, str(path), groups=(sock,))
        fix = f"setfacl -m u:mbt-alice:rx,m::rx {run}"
        assert told == (
            f"Permission denied: {run} is mode 0750, with an ACL, owner root, group root, "
            f"whose entry for uid {alice.uid} (mbt-alice) does not let it search it: have "
            f"root run '{fix}', or start the daemon with a --socket outside it"), told
        assert probe(package, dave, str(path)) == (
            f"Permission denied: {run} is mode 0750, with an ACL, owner root, group root, "
            f"whose ACL lets group mbt-sock in, and uid {dave.uid} (mbt-dave) is not in "
            "group mbt-sock: add mbt-dave to it ('usermod -aG mbt-sock mbt-dave'), then "
            "log in again")
        assert probe(package, carol, str(path)) == (
            f"Permission denied: {run} is mode 0750, with an ACL, owner root, group root, "
            f"whose ACL lets group mbt-admins in; uid {carol.uid} (mbt-carol) is in group "
            "mbt-admins, but this process is not: log in again (or run 'newgrp "
            "mbt-admins') since being added to it")
        # What each is told lets them in, as the kernel has it.
        assert probe(package, dave, str(path), groups=(sock,)) == "connected"
        assert probe(package, carol, str(path), groups=(admins,)) == "connected"
        subprocess.run(fix, shell=True, check=True)
        assert probe(package, alice, str(path), groups=(sock,)) == "connected"


def test_an_acl_whose_mask_is_empty_is_not_read_by_the_kernel(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    """Found by review: with the mask (the mode's group bits) empty the kernel judges
    by the mode alone (acl_permission_check() in fs/namei.c), and the others' search
    lets the socket group's members in; the start warned that it kept them out."""
    sock = accounts["mbt-sock"].gid
    run = shared / "run"
    run.mkdir()
    run.chmod(0o711)
    subprocess.run(["setfacl", "-m", "u:mbt-alice:rwx,g:mbt-sock:rwx,m::-", str(run)],
                   check=True)
    path = run / "s.sock"
    with listening(path, 0o666, sock):
        assert probe(package, accounts["mbt-alice"], str(path), groups=(sock,)) == "connected"
        assert kept_out(path, 0o666, sock) is None


def test_a_socket_with_the_acl_of_its_directorys_default_is_told_so(
    package: Path, shared: Path, accounts: dict[str, Account]
) -> None:
    """Found by review: a socket bound in a directory with a default ACL takes that
    ACL (its group's entry too, whatever the mode's group bits), and the client it
    kept out was told that --socket-mode and --socket-group decide who may connect.
    The daemon drops it from the socket it binds; systemd's socket unit (bound as
    this test binds) does not."""
    sock = accounts["mbt-sock"].gid
    run = shared / "run"
    run.mkdir()
    run.chmod(0o755)
    subprocess.run(["setfacl", "-m", "d:u:mbt-dave:r,d:g::rx", str(run)], check=True)
    path = run / "s.sock"
    alice, dave = accounts["mbt-alice"], accounts["mbt-dave"]
    inherited = ("(a socket takes its ACL from the default ACL of its directory, whatever "
                 f"its mode: 'getfacl {run}' shows it; the daemon drops it from a socket it "
                 "binds, not from one the socket unit binds)")
    with listening(path, 0o660, sock):
        assert probe(package, alice, str(path), groups=(sock,)) == (
            f"Permission denied: {path} is mode 0660, with an ACL, owner root, group "
            f"mbt-sock, whose ACL does not let uid {alice.uid} (mbt-alice) connect to it "
            f"{inherited}")
        assert probe(package, dave, str(path)) == (
            f"Permission denied: {path} is mode 0660, with an ACL, owner root, group "
            f"mbt-sock, whose entry for uid {dave.uid} (mbt-dave) does not let it connect "
            f"{inherited}")


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
