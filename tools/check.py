"""Run every check CI runs: ruff, mypy --strict, and the whole pytest suite.

Usage: ``python tools/check.py [PYTEST ARGS...]`` from the project's virtual
environment (the README's test command sets one up).  Tools that the tests need
from the operating system (systemd's ``systemd-analyze``,
``systemd-socket-activate`` and its service manager; util-linux's ``unshare``
and ``nsenter``; iproute2's ``ip`` and ``ss``; a real QEMU, ``qemu-system-x86_64``, and its
``qemu-img``; ``man`` and ``zsh`` for the man pages and completion scripts;
util-linux's ``setpriv`` for clients of other uids; the ``sqlite3`` shell;
``strace`` for fault injection; ``patch``, which the diffs of stale generated
files must satisfy; and ``setfacl``, for directories with an ACL) are installed
with apt-get when missing and we are root; otherwise the run stops with a
message saying what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each tool the tests run, and the Debian package that provides it.
SYSTEM_TOOLS = {
    "systemd-analyze": "systemd",
    "systemd-socket-activate": "systemd",
    # A real service manager (systemd --user) in namespaces of its own.
    "systemctl": "systemd",
    "systemd-sysusers": "systemd",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "setpriv": "util-linux",
    # The metrics endpoint behind small TCP buffers, in a network namespace.
    "ip": "iproute2",
    # What waits unread in a process's sockets: a reply under way when the daemon dies.
    "ss": "iproute2",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    # The man pages are rendered with man -l, the zsh completion loaded by zsh.
    "man": "man-db",
    "zsh": "zsh",
    # The backup in docs/state.md is taken with the sqlite3 shell, and tested so.
    "sqlite3": "sqlite3",
    # Fault injection: a disk that fails under the daemon, a QEMU that stalls.
    "strace": "strace",
    # The diffs of stale generated files must apply with patch(1).
    "patch": "patch",
    # A socket directory with an access ACL, as the daemon's warning says to fix it.
    "setfacl": "acl",
}


def ensure_system_tools() -> None:
    missing = sorted({pkg for tool, pkg in SYSTEM_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"check: install these packages first: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-q", "-y", *missing], check=True, env=env)


def run(*argv: str) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=ROOT, check=True)


def main() -> None:
    ensure_system_tools()
    try:
        run(sys.executable, "-m", "ruff", "check", ".")
        run(sys.executable, "-m", "mypy")
        run(sys.executable, "-m", "pytest", *sys.argv[1:])
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
