"""What the start and each reload warn of in the ``[access]`` policy.

None of it stops the daemon: each is an entry that does not do what it says
(a name no database knows, a role root cannot lose, an entry by number shadowed
or read as a number that is also a name, an id the daemon's user namespace
does not map, an account another user can become through /etc/subuid).  Apart
from :mod:`migblockd.resolver`, which decides roles, because these are said once
per policy, not asked per connection; the resolver's methods find most entries,
these lines word them.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable

from migblockd.access import Role, is_number
from migblockd.databases import uid_of
from migblockd.resolver import Resolver

__all__ = ["policy_warnings"]


def _unplaced(*keys: str) -> str:
    return "access"


def policy_warnings(resolver: Resolver,
                    where: Callable[..., str] = _unplaced) -> list[str]:
    """What the start and each reload warn of in the access policy (and
    ``--check-config`` prints): none stops the daemon, each is a policy that does
    not do what it says.  ``where(*keys)``: how a line names the entry ``keys`` of
    the table (``users``, ``alice``): ``FILE:LINE: access`` from the file that
    gives it (``Sources.entry``), so that a long policy need not be searched."""
    # Not an error: the user may be created later (it counts after a reload).
    lines = [f"{where(*keys)}: the policy names {name}, which does not exist"
             for keys, name in resolver.unknown_names()]
    lines += [f"{where(*keys)}: the policy gives {entry}, but root and the daemon's own "
              "user are always admin" for keys, entry in resolver.overruled()]
    lines += [f"{where(*keys)}: the policy gives {entry}: the entry by number applies (a "
              "user's uid is looked up before its name); give the user one entry"
              for keys, entry in resolver.shadowed()]
    lines += [f"{where(*keys)}: the policy gives {entry}"
              for keys, entry in resolver.named_like_numbers()]
    lines += [f"{where(*keys)}: the policy gives {entry}: " + (
        "a client of that uid is taken for one whose uid the kernel did not report, and "
        "has default-role" if keys[0] == "users" else "a client whose reported gid it "
        "is gets the role only if the group database puts its user in the group")
              for keys, entry in resolver.unmapped_entries()]
    lines += [f"{where('users', key)}: {line}" for key, line in _subordinate_accounts(resolver)]
    if resolver.policy.default_role is Role.ADMIN:
        # Access control is then off for whoever the socket's mode lets in (with 0666,
        # every local user): said, as the other roles' limits are the point of a policy.
        lines.append(f"{where('default-role')}: default-role is admin: every user who can "
                     "connect to the socket, and any client whose uid the kernel did not "
                     "report, is an admin, who may migrate to an exec: URI (QEMU runs the "
                     "command as its own user), run the commands forwarded to QEMU and "
                     "delete any blocker; give admin in users or groups to those who need it "
                     "instead")
    return lines


def _subordinate_accounts(resolver: Resolver) -> list[tuple[str, str]]:
    """``users`` entries for an account whose uid lies in another user's range of
    subordinate uids.  The entry decides that uid's role (resolver step 2, which a
    container's uid named by number is given for), and the range's owner can
    ``setuid()`` to it in a user namespace of their own: the daemon cannot tell the
    two apart, so the owner has the account's role too, and the account's blockers
    count against the owner's per-uid limits."""
    found = []
    for key, role in resolver.policy.users:
        uid = int(key) if is_number(key) else uid_of(key)
        owner = None if uid is None else resolver.owner_of(uid)
        if uid is None or owner is None or (name := _account(uid)) is None:
            continue  # a uid without an account: a container's, as step 5 means it
        login = _account(owner)
        whose = f"uid {owner}" + (f" ({login})" if login else "")
        holder = login or f"uid {owner}"
        # An admin's holdings count against nobody (quota_rules): said only otherwise.
        limits = "" if role is Role.ADMIN else (
            f", and what {name} holds counts against {holder}'s per-uid limits")
        found.append((key, (
            f"the policy gives user {key!r} role {role}, but uid {uid} ({name}) is also a "
            f"subordinate uid of {whose} in {resolver.subuid_file}, who can become it in a "
            "user namespace of their own: the daemon cannot tell them apart, so "
            f"{holder} has that role too{limits}; give {name} a uid outside every range "
            f"there, or take it out of {holder}'s (usermod --del-subuids {uid}-{uid} "
            f"{login or owner})")))
    return found


def _account(uid: int) -> str | None:
    """The user name of ``uid`` (off the loop, as the policy's names are looked up)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
