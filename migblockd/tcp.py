"""A TCP ``--metrics`` address: what it resolves to, and whether this user may listen there.

The start listens where :func:`resolve_tcp` says; ``--check-config`` and a
reload's check of the next start ask the same, and :func:`check_port` what
the kernel would refuse this user without listening anywhere (a port in use is
the start's to find: a running daemon's own would look taken).  A listen that
fails is told with what to do about it (:func:`cannot_listen`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from migblockd.kinds import HostPort
from migblockd.startup import (
    EXIT_FAILURE,
    EXIT_NOTCONFIGURED,
    NotConfigured,
    StartupError,
    status_of,
)
from migblockd.trust import named_uid

__all__ = ["cannot_listen", "check_address", "check_port", "resolve_all", "resolve_tcp"]


def resolve_tcp(address: HostPort, setting: str = "--metrics") -> tuple[Any, ...]:
    """``getaddrinfo``'s first answer for a TCP ``--metrics`` address; StartupError when none.

    ``setting``: how the message names it (:meth:`Sources.named`)."""
    return resolve_all(address, setting)[0]


def resolve_all(address: HostPort, setting: str = "--metrics") -> list[tuple[Any, ...]]:
    """``getaddrinfo``'s answers for a TCP ``--metrics`` address, in its order (a name
    may have several: ``localhost``, ``[::1]`` and ``127.0.0.1``); StartupError when none."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        # A resolver that may answer at the next start (one not reachable yet, at
        # boot) is told from a name it does not know.
        passing = exc.errno in (socket.EAI_AGAIN, socket.EAI_SYSTEM, socket.EAI_MEMORY)
        raise StartupError(f"{setting} {address}: {exc.strerror}",
                           EXIT_FAILURE if passing else EXIT_NOTCONFIGURED) from None
    except UnicodeError:  # the IDNA codec's: a host that ListenAddress did not check
        raise NotConfigured(f"{setting} {address}: not a host name the resolver can be "
                            "asked about (an empty label, or one over 63 characters)") from None
    return infos


def cannot_listen(address: HostPort, setting: str, code: int) -> str:
    """The start's message when listening on a TCP ``--metrics`` address fails with
    errno ``code``, with what to do about the usual causes; ``setting`` names it."""
    why = f"{setting} {address}: cannot listen: {os.strerror(code)}"
    if code == errno.EADDRINUSE:
        return (f"{why}; another program (another migblockd, say) listens on that port "
                f"(`ss -ltnp 'sport = :{address.port}'` names it): stop it, or choose "
                "another port")
    if code == errno.EACCES and address.port and _privileged(address.port):
        start = _unprivileged_start()
        if _has_capability() and _network_not_ours():
            return (f"{why}; a port below {start} takes the CAP_NET_BIND_SERVICE capability "
                    "in the user namespace that owns the network namespace, and this "
                    "daemon has it only in a user namespace of its own (unshare --user "
                    f"without --net?): choose a port of {start} or more, or start it "
                    "outside that user namespace")
        return (f"{why}; a port below {start} takes the CAP_NET_BIND_SERVICE capability, "
                f"which this daemon, running as {named_uid(os.geteuid())}, does not have: "
                f"choose a port of {start} or more, or grant it (under systemd, "
                "AmbientCapabilities=CAP_NET_BIND_SERVICE)")
    if code in (errno.EINVAL, errno.ENODEV, errno.EADDRNOTAVAIL) and (
            advice := _link_local_advice(address, code)):
        return f"{why}; {advice}"
    if code == errno.EADDRNOTAVAIL:
        loopback = "[::1]" if ":" in address.host else "127.0.0.1"  # the same family
        return (f"{why}; no interface of this machine has that address (`ip -brief "
                f"address` lists theirs): choose one of them, or {loopback}")
    return why


def check_address(address: HostPort, setting: str = "--metrics") -> None:
    """StartupError when no interface of this machine has ``address``'s host.

    Asked of the kernel by binding a socket to that host and port 0, at once
    closed: no port is taken from anyone (the daemon's own included, while it
    runs), and nothing is listened on."""
    family, kind, proto, _, sockaddr = resolve_tcp(address, setting)
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind((sockaddr[0], 0, *sockaddr[2:]))
        except OSError as exc:
            # EINVAL: a link-local IPv6 address without its interface; ENODEV:
            # with a number that is no interface.
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.ENODEV):
                raise StartupError(cannot_listen(address, setting, exc.errno),
                                   status_of(exc.errno)) from None


def _link_local_advice(address: HostPort, code: int) -> str | None:
    """What to do about a link-local IPv6 address (``fe80::/10``, which each
    interface may have) that the kernel would not listen on: one without its
    interface (``EINVAL``), with a number that is no interface (``ENODEV``), or
    with an interface that does not have it (``EADDRNOTAVAIL``).  None for any
    other address, and for the last when no interface has it."""
    try:
        family, _, _, _, sockaddr = resolve_tcp(address)
    except StartupError:
        return None
    if family != socket.AF_INET6:
        return None
    ip = ipaddress.IPv6Address(sockaddr[0].partition("%")[0])
    if not ip.is_link_local:
        return None
    owners = _interfaces_with(ip)
    scoped = f"[{ip}%{owners[0]}]:{address.port}" if owners else None
    scope = sockaddr[3]
    if not scope:
        if scoped is None:
            return (f"{ip} is a link-local address, which no interface of this machine "
                    "has (`ip -brief address` lists theirs): choose one of them with its "
                    "interface ([fe80::...%eth0]), or [::1]")
        return (f"{ip} is a link-local address, which every interface may have: name "
                f"the interface, as {scoped}")
    if code == errno.ENODEV:
        return (f"interface {scope} is none of this machine's: " + (
            f"{ip} is on {owners[0]}, as {scoped}" if scoped else
            "`ip -brief address` lists them"))
    if scoped is None:
        return None
    with contextlib.suppress(OSError):
        scope = socket.if_indextoname(scope)
    return f"{ip} is not on interface {scope} but on {owners[0]}: name that one, as {scoped}"


#: /proc/net/if_inet6's flags of an address that cannot be listened on yet, or ever:
#: IFA_F_TENTATIVE (duplicate address detection running), IFA_F_DADFAILED.
_UNUSABLE = 0x40 | 0x08


def _interfaces_with(ip: ipaddress.IPv6Address) -> list[str]:
    """The interfaces that have ``ip``, as the kernel lists them (where /proc is
    hidden, none: a bind would not tell under ``ip_nonlocal_bind``)."""
    try:
        lines = Path("/proc/self/net/if_inet6").read_text().splitlines()
    except OSError:
        return []
    names = []
    for line in lines:
        fields = line.split()
        with contextlib.suppress(ValueError, IndexError):
            if (ipaddress.IPv6Address(int(fields[0], 16)) == ip
                    and not int(fields[4], 16) & _UNUSABLE):
                names.append(fields[5])
    return names


def check_port(address: HostPort, setting: str = "--metrics") -> None:
    """StartupError when this process may not listen on ``address``'s port: one
    below ``net.ipv4.ip_unprivileged_port_start`` (1024 by default) without the
    CAP_NET_BIND_SERVICE capability, which every user but root lacks (and root
    too, in a unit that drops it).  Told without binding: a port in use is left
    to the start, since a running daemon's own would look taken."""
    if address.port and _privileged(address.port) and not _binds_low_ports():
        raise NotConfigured(cannot_listen(address, setting, errno.EACCES))


def _privileged(port: int) -> bool:
    """Whether ``port`` is below the sysctl's start; False when it cannot be read
    (the units' ``ProcSubset=pid`` hides ``/proc/sys``): the start then finds out."""
    start = _unprivileged_start()
    return start is not None and port < start


def _unprivileged_start() -> int | None:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return None


def _binds_low_ports() -> bool:
    """Whether this process has CAP_NET_BIND_SERVICE where it counts, in the
    network namespace's own user namespace (True when it cannot be told)."""
    return _has_capability() and not _network_not_ours()


def _network_not_ours() -> bool:
    """Whether this process's network namespace belongs to an ancestor of its
    user namespace (``unshare --user`` without ``--net``, a rootless container
    sharing the host's network): the capabilities it holds in its own user
    namespace do not count there.  False when it cannot be told."""
    try:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.close(fcntl.ioctl(fd, _NS_GET_USERNS))
    except PermissionError:
        # ioctl_ns(2): the owner is outside this user namespace.  One it gives is
        # this one or a descendant, where this process's capabilities count too.
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _has_capability() -> bool:
    """Whether this process has CAP_NET_BIND_SERVICE in its own user namespace
    (True when it cannot be told)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_NET_BIND_SERVICE & 1)
    return True


#: capability.h: the capability to bind ports below ip_unprivileged_port_start.
_CAP_NET_BIND_SERVICE = 10
#: linux/nsfs.h: _IO(0xb7, 0x1), the user namespace that owns a namespace.
_NS_GET_USERNS = 0xB701
