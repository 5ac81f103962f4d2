"""Where things live on disk by default."""

from __future__ import annotations

import os
from pathlib import Path


def default_socket_path() -> Path:
    """The socket the daemon listens on and the shell connects to by default.

    root gets ``/run/migblockd/migblockd.sock`` (what ``migblockd.socket`` uses);
    other users get ``$XDG_RUNTIME_DIR/migblockd/migblockd.sock``, or a per-user
    directory under the temporary directory when there is no runtime directory.
    """
    if os.geteuid() == 0:
        return Path("/run/migblockd/migblockd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "migblockd" / "migblockd.sock"
    return fallback_socket_dir() / "migblockd.sock"


def fallback_socket_dir() -> Path:
    """``${TMPDIR:-/tmp}/migblockd-UID``: in a directory every user can write to, so the
    daemon refuses it unless it is its own (see ``migblockd.server.make_socket_dir``)."""
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp) / f"migblockd-{os.geteuid()}"
