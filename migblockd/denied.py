"""Which file made the kernel refuse a ``connect()`` to a Unix socket, and why.

Connecting needs search permission on every directory on the way and write
permission on the socket file (unix(7)).  Under the systemd units the socket is
0660 in a directory of mode 0750 whose group is ``migblockd-clients``: a user
outside that group is refused by the directory, whatever the socket's mode, and
so is one just added to it (``usermod -aG``) from a session that started before,
whose process does not have the group yet.  "Permission denied" alone says none
of this; :func:`explain` names the file, its mode, owner and group, and what
would let this process in.

A directory with an access ACL (acl(5)) is judged by its entries, as the kernel
judges it: there the mode's group bits are only the ACL's mask, and ``chmod g+x``
changes nothing but the mask, so what lets a group in is ``setfacl``.

A process in a user namespace of its own (``unshare --user --map-root-user``, a
rootless container) sees the files whose owner or group its namespace does not
map with the overflow ids (65534), and its root has no power over them
(:mod:`migblockd.userns`): the kernel judges it as the uid it is outside, by
bits that cannot be told from inside but for a mapped group's.  Such a refusal
is said so, not judged as the host's root would be, or as an owner ``nobody``.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Collection
from pathlib import Path

from migblockd import acl as acls
from migblockd.acl import Acl, read_acl
from migblockd.userns import Namespace, own_namespace

__all__ = ["explain", "kept_out"]

_SEARCH, _WRITE = 1, 2  # the permission bits of one class (other's; shifted for the rest)


def explain(path: str, uid: int | None = None, groups: Collection[int] | None = None) -> str | None:
    """What refuses ``uid`` (in ``groups``) the socket at ``path``; None if no mode does.

    The default identity is this process's: its effective uid, gid and
    supplementary groups, which are what the kernel checks.  None means that
    every mode on the way allows it (a security module refused, or the files
    changed meanwhile), or that a file on the way cannot be looked at.  Only the
    default identity is judged in its user namespace (:func:`_unmapped`): a uid
    given is judged as the host's.
    """
    namespace = None
    if uid is None:
        uid, namespace = os.geteuid(), own_namespace()
    if groups is None:
        groups = {os.getegid(), *os.getgroups()}
    target = Path(os.path.abspath(path))
    try:
        for directory in reversed(target.parents):
            st, acl = os.stat(directory), read_acl(directory)
            if why := _refusal(directory, st, uid, groups, _SEARCH, acl, namespace):
                return why
        st, acl = os.stat(target), read_acl(target)
    except OSError:
        return None
    return _refusal(target, st, uid, groups, _WRITE, acl, namespace)


def _refusal(path: Path, st: os.stat_result, uid: int, groups: Collection[int], need: int,
             acl: Acl, namespace: Namespace | None) -> str | None:
    """Why ``path`` refuses ``need``, or None if it lets it (or cannot be told to refuse)."""
    mapped = namespace is None or namespace.maps(st.st_uid, st.st_gid)
    if namespace is not None and not mapped and st.st_uid != uid:
        # Its owner and root's power over it cannot be seen: a member of its mapped group is
        # judged by the group's bits (acl_permission_check(), fs/namei.c), others by theirs.
        member = namespace.maps_group(st.st_gid) and st.st_gid in groups
        if _allows(st, uid, groups, need, acl, root=False) if member else st.st_mode & need:
            return None
        return _unmapped(path, st, uid, need, namespace, st.st_gid if member else None)
    if _allows(st, uid, groups, need, acl, root=mapped):
        return None
    return _why(path, st, uid, groups, need, acl)


def _unmapped(path: Path, st: os.stat_result, uid: int, need: int,
              namespace: Namespace, group: int | None = None) -> str:
    """A refusal by a file of another owner, its owner or group unmapped: the kernel judges
    the process as its uid outside; ``group``: the file's, if mapped and this one's."""
    outside = namespace.uid_outside(uid)
    who = f"uid {outside}" if outside is not None else "the uid it is outside"
    root = ", whose root this process is only" if uid == 0 else f", where this process is uid {uid}"
    verb = "search" if need == _SEARCH else "connect to"
    whom = "others" if group is None else f"its group, gid {group}, which this process is in,"
    return (f"{path} is mode {stat.S_IMODE(st.st_mode):04o}, its owner and group not both "
            f"mapped into this process's user namespace{root}: the kernel judges it as "
            f"{who} outside the namespace (root of a user namespace has no power over a "
            f"file it does not map, user_namespaces(7)), and the mode does not let {whom} "
            f"{verb} it; connect from outside the namespace as a user the socket lets in "
            f"(there the client names what refuses {who} and what would let it in)")


def kept_out(path: Path, mode: int, gid: int, option: str = "--socket") -> str | None:
    """What keeps out of ``path`` those its socket ``mode`` (group ``gid``) lets connect;
    ``option``: the setting that gives ``path``, as what to change (``Sources.choice``).

    A directory on the way that they may not search refuses them whatever the
    socket's mode: one the daemon creates is made searchable for them, but one
    that exists is left as it is (a 0700 ``/run/migblockd`` left by a start with
    the default mode, say).  The start logs this, and ``--check-config`` says it,
    since the only other sign is a client's "Permission denied".  Judged for a
    member of ``gid`` (or any user, for the others' bits) who owns none of the
    directories; None when nothing on the way keeps them out, or when the mode
    lets nobody else connect.

    One line names every directory on the way that keeps anyone out, everyone
    kept out, and what lets them all in, so that following it once is enough:
    named one directory and one class at a time, each fix would only earn the
    next start another warning (the others after the group's ``g+x``).
    """
    if not mode & 0o022:
        return None
    blocked: list[tuple[Path, os.stat_result, Acl, str]] = []
    refused = {"members": False, "others": False}
    for directory in reversed(path.parents):
        try:
            st = os.stat(directory)
        except OSError:
            break  # made by the start, as the mode says; or not ours to judge
        acl = read_acl(directory)
        members = bool(mode & 0o020) and not _allows(st, -1, {gid}, _SEARCH, acl)
        others = bool(mode & 0o002) and not _allows(st, -1, set(), _SEARCH, acl)
        if not (members or others):
            continue
        refused["members"] |= members
        refused["others"] |= others
        blocked.append((directory, st, acl,
                        _opening(directory, st, acl, path, gid, members, others)))
    if not blocked:
        return None
    # Looked up only now, for the warning: each start judges the directories, and a
    # group database that does not answer must not hold one that has nothing to say.
    group = _group_name(gid)
    if refused["members"] and refused["others"]:
        whom = "every user"
    elif refused["members"]:
        whom = f"the members of group {group}"
    elif mode & 0o020:  # the group's members get through: only the rest are kept out
        whom = f"every user outside group {group}"
    else:
        whom = "every user"
    what = ", and ".join(_described(d, st, acl) for d, st, acl, _ in blocked)
    fix = " and ".join(opening for _, _, _, opening in blocked)
    top = blocked[0][0]
    if top == path.parent:
        fix += " (or remove it: the daemon creates it searchable for them)"
    else:  # not the daemon's to make: loosening it may not be the operator's call
        # "a socket in FILE outside it" could read as outside the file: named then.
        alone = len(blocked) == 1 and option.startswith("--")
        fix += f", or choose a {option} outside " + ("it" if alone else str(top))
    return (f"socket mode {mode:04o} lets {whom} connect to {path}, but {what}, "
            f"which they may not search, so they cannot connect; {fix}")


def _opening(directory: Path, st: os.stat_result, acl: Acl, path: Path, gid: int,
             members: bool, others: bool) -> str:
    """The command that lets through ``directory`` whom it keeps out.

    The kernel judges a member of its group by the group's bits alone, whatever
    the others' allow: a 0666 socket in a root:root 0700 directory needs both.
    Under an ACL, by the group entries that name a group of theirs, if any: an
    entry of its own for the socket's group lets them in, with the search added
    to the mask (:func:`_grant`).
    """
    if acl and members:
        grant = _grant(directory, acl, f"g:{_group_name(gid)}",
                       acls.entry(acl, acls.GROUP, gid) or 0)
        return grant + (f" and chmod o+x {directory}" if others else "")
    if members and st.st_gid != gid and not others:
        # Only the group is let in, so the socket's own directory is given the
        # group rather than opened to everyone; one above is not the daemon's, and
        # its group may be there for other reasons: the others' search bit leaves it.
        if directory == path.parent:
            return f"chgrp {_group_name(gid)} {directory} and chmod g+x {directory}"
        return f"chmod o+x {directory}"
    # A member outside the directory's group goes by the others' bits, as the rest do.
    classes = ("g" if members and st.st_gid == gid else "") + ("o" if others else "")
    return f"chmod {classes}+x {directory}"


def _grant(directory: Path, acl: Acl, qualifier: str, perm: int) -> str:
    """The ``setfacl`` that adds the search to ``qualifier``'s entry (``perm`` now).

    With the mask given: otherwise setfacl recomputes it as the union of every
    entry it limits, and a named entry the mask kept from writing (a ``chmod
    g-w`` under an ACL) could then write, replace the socket, and the directory
    would be writable by others for the next start.  The mask gains the search
    alone; absent, the group's own entry is what it was."""
    mask = acls.entry(acl, acls.MASK)
    if mask is None:
        mask = acls.entry(acl, acls.GROUP_OBJ) or 0
    return (f"setfacl -m {qualifier}:{_letters(perm | _SEARCH)},m::{_letters(mask | _SEARCH)}"
            f" {directory}")


def _allows(st: os.stat_result, uid: int, groups: Collection[int], need: int,
            acl: Acl = (), *, root: bool = True) -> bool:
    """Whether the kernel lets ``uid`` (in ``groups``) do ``need`` (posix_acl_permission()
    in fs/posix_acl.c, or the mode alone without an ACL).  ``root``: whether uid 0's
    capabilities reach the file (not when its user namespace does not map it)."""
    if uid == 0 and root:  # root is let through (CAP_DAC_OVERRIDE)
        return True
    if uid == st.st_uid:
        return bool(st.st_mode >> 6 & need)
    if not _consulted(st, acl):
        bits = st.st_mode >> 3 if st.st_gid in groups else st.st_mode
        return bool(bits & need)
    mask = _mask(acl)
    named = acls.entry(acl, acls.USER, uid)
    if named is not None:
        return bool(named & mask & need)
    matched = [perm for tag, perm, id in acl
               if (tag == acls.GROUP_OBJ and st.st_gid in groups)
               or (tag == acls.GROUP and id in groups)]
    if matched:  # one of them must let it; the others' entry no longer counts
        return any(perm & mask & need for perm in matched)
    return bool(st.st_mode & need)  # the others' entry is the mode's others' bits


def _mask(acl: Acl) -> int:
    """What the mask lets through: everything where the ACL has none."""
    mask = acls.entry(acl, acls.MASK)
    return 7 if mask is None else mask


def _consulted(st: os.stat_result, acl: Acl) -> bool:
    """Whether the kernel reads the ACL at all: not when its mask (the mode's group
    bits) is empty, when it judges by the mode alone, so that a named entry's user
    is let in as the others are (acl_permission_check() in fs/namei.c)."""
    return bool(acl) and bool(st.st_mode & 0o070)


def _letting(st: os.stat_result, acl: Acl, need: int) -> list[int]:
    """The groups whose members the file lets do ``need``: its own group by the
    group's bits; under an ACL, each group entry that does through the mask, the
    groups named in it first (put there to let them in)."""
    if not _consulted(st, acl):
        return [st.st_gid] if st.st_mode >> 3 & need else []
    mask = _mask(acl)
    found = [id for tag, perm, id in acl if tag == acls.GROUP and perm & mask & need]
    own = acls.entry(acl, acls.GROUP_OBJ) or 0
    return found + ([st.st_gid] if own & mask & need else [])


def _letters(perm: int) -> str:
    return "".join(c for c, bit in (("r", 4), ("w", 2), ("x", 1)) if perm & bit)


def _described(path: Path, st: os.stat_result, acl: Acl) -> str:
    return (f"{path} is mode {stat.S_IMODE(st.st_mode):04o}" + (", with an ACL" if acl else "")
            + f", owner {_user_name(st.st_uid)}, group {_group_name(st.st_gid)}")


def _why(path: Path, st: os.stat_result, uid: int, groups: Collection[int], need: int,
         acl: Acl) -> str:
    what = _described(path, st, acl)
    who = f"uid {uid}" + (f" ({name})" if (name := _account(uid)) else "")
    entry = acls.entry(acl, acls.USER, uid)
    if uid != st.st_uid and entry is not None and _consulted(st, acl):
        # The user's own entry decides, whatever the groups: joining one changes nothing.
        if need == _WRITE:
            return f"{what}, whose entry for {who} does not let it connect {_inherited(path)}"
        admin = "root" if st.st_uid == 0 else f"{_user_name(st.st_uid)} (or root)"
        return (f"{what}, whose entry for {who} does not let it search it: have {admin} "
                f"run '{_grant(path, acl, f'u:{name or uid}', entry)}', or start the "
                "daemon with a --socket outside it")
    letting = [gid for gid in _letting(st, acl, need) if gid not in groups]
    joined = [gid for gid in letting if name and _member(name, uid, gid)]
    # Never "join group root": that opens far more than the socket (a root:root
    # /run/migblockd, made without the tmpfiles.d line, needs its group changed).
    joinable = joined or [gid for gid in letting if gid != 0]
    if uid != st.st_uid and joinable:
        gid = joinable[0]
        group = _group_name(gid)
        if gid != st.st_gid:
            what += f", whose ACL lets group {group} in"
        if joined:
            return (f"{what}; {who} is in group {group}, but this process is not: log in "
                    f"again (or run 'newgrp {group}') since being added to it")
        add = f"add {name} to it ('usermod -aG {group} {name}')" if name else "add the user to it"
        return f"{what}, and {who} is not in group {group}: {add}, then log in again"
    if need == _SEARCH:
        return (f"{what}, which does not let {who} search it: "
                f"{_search_hint(path, st, uid, groups, acl)}")
    if _consulted(st, acl):
        return f"{what}, whose ACL does not let {who} connect to it {_inherited(path)}"
    return (f"{what}, which does not let {who} connect to it; the daemon's --socket-mode and "
            "--socket-group (the socket unit's SocketMode= and SocketGroup=) decide who may "
            "connect")


def _inherited(path: Path) -> str:
    """Where a socket's ACL comes from: whatever its mode, its group's entry and
    the named ones are those of the directory's default ACL (acl(5)).  The daemon
    drops it from a socket it binds (:func:`migblockd.acl.mode_only`); systemd's
    socket unit binds the socket itself."""
    return (f"(a socket takes its ACL from the default ACL of its directory, whatever "
            f"its mode: 'getfacl {path.parent}' shows it; the daemon drops it from a "
            f"socket it binds, not from one the socket unit binds)")


def _search_hint(directory: Path, st: os.stat_result, uid: int, groups: Collection[int],
                 acl: Acl) -> str:
    """What lets ``uid`` (in ``groups``) through ``directory``, which it may not search.

    Here the directory's group may not search it either (a group that may is named
    by :func:`_why` with how to join it).  Its mode is its owner's to change, not
    the daemon's, which makes only the socket's own directory, and searchable by
    those its socket mode lets in: the way in is another user, the owner's word,
    or a socket elsewhere.
    """
    if uid == st.st_uid:
        return f"as its owner, run 'chmod u+x {directory}'"
    admin = "root" if st.st_uid == 0 else f"{_user_name(st.st_uid)} (or root)"
    if acl:  # chmod g+x would change only the mask
        opening = (f"grant a group of this user's the search "
                   f"('{_grant(directory, acl, 'g:GROUP', 0)}')")
    elif st.st_gid in groups:
        opening = f"open it to its group ('chmod g+x {directory}')"
    else:
        # (Group root may search it, but joining root opens far more than the socket.)
        steps = [f"'chgrp GROUP {directory}'"]
        if not st.st_mode & stat.S_IXGRP:
            steps.append(f"'chmod g+x {directory}'")
        opening = f"open it to a group of this user's ({' and '.join(steps)})"
    from migblockd.paths import SYSTEM_SOCKET  # noqa: PLC0415 (paths imports this module)

    if directory == SYSTEM_SOCKET.parent:
        # Made anew at each boot: a chgrp by hand lasts until the next one.
        opening += (" (and, to keep it so after a reboot, install the tmpfiles.d line "
                    f"migblockd ships: 'd {directory} 0750 root migblockd-clients -')")
    return (f"run as a user it lets in, or have {admin} {opening}, or start the daemon "
            "with a --socket outside it")


def _member(name: str, uid: int, gid: int) -> bool:
    """Whether the user and group databases put ``name`` in group ``gid``."""
    try:
        if pwd.getpwuid(uid).pw_gid == gid:
            return True
        return name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def _account(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _user_name(uid: int) -> str:
    return _account(uid) or str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
