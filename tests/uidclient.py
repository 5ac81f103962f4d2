"""A QMP client to run as another user (under ``setpriv``): standard library only.

``python -I uidclient.py SOCKET``: connects, then relays.  Each line on stdin
is one request, sent as is; every message the daemon sends (greeting, events,
replies) is written to stdout as one line.  When the connection cannot be
made, the only output is ``{"connect-error": ERRNO_NAME, "desc": STRERROR}``
and the exit status is 2.  It must run with any Python 3 from the
distribution, because the project's venv may not be readable by the uid the
test runs it as.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import threading


def pump(sock: socket.socket) -> None:
    """Everything the daemon sends, to stdout, line by line."""
    reader = sock.makefile("rb")
    for line in reader:
        sys.stdout.write(line.decode("utf-8", "replace").rstrip("\r\n") + "\n")
        sys.stdout.flush()


def main() -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sys.argv[1])
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        sys.stdout.write(json.dumps({"connect-error": name, "desc": exc.strerror}) + "\n")
        return 2
    reader = threading.Thread(target=pump, args=(sock,), daemon=True)
    reader.start()
    for line in sys.stdin:
        sock.sendall(line.encode())
    sock.shutdown(socket.SHUT_WR)
    reader.join(10)  # the replies to the last requests
    return 0


if __name__ == "__main__":
    sys.exit(main())
