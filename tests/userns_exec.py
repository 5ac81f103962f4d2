"""Run a program in a new user namespace with the maps given, as this same process.

``userns_exec.py UID_MAP GID_MAP PROGRAM [ARG...]``, each map's lines separated
by commas (``"0 0 65536"``, ``"0 0 1,991 991 1"``), as uid_map and gid_map take
them (user_namespaces(7)).  util-linux's ``unshare --map-users`` needs shadow's
``newuidmap``, and ``--map-root-user`` maps one id only: a daemon in a namespace
that maps a client's uid but not its gid needs maps of its own.  Run as root: a
child left in the initial namespace writes them (only a process with
CAP_SETUID there may map more than its own uid), and this process then becomes
``PROGRAM``, so that its pid is the program's and signals reach it.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000  # linux/sched.h

uid_map, gid_map, *argv = sys.argv[1:]
ready, go = os.pipe()
child = os.fork()
if child == 0:
    os.close(go)
    os.read(ready, 1)  # the parent is in its namespace
    for name, lines in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{os.getppid()}/{name}", "w", encoding="ascii") as f:
            f.write(lines.replace(",", "\n") + "\n")
    os._exit(0)
os.close(ready)
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(CLONE_NEWUSER) != 0:
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
os.write(go, b"x")
if os.waitpid(child, 0)[1] != 0:
    sys.exit("userns_exec.py: the maps could not be written")
os.execv(argv[0], argv)
