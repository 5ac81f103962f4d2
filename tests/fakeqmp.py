"""A QMP server that is not migblockd, for the clients' handling of what migblockd
never sends: a greeting or an answer of the wrong shape, or text that would steer
a terminal.  Threads, so that a test may run the client as a child process."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["GREETING", "INTROSPECTION", "SILENT", "Line", "Raw", "serving"]


class Raw(str):
    """JSON text sent as it is: what Python's ``json`` could not write (a value
    nested deeper than it recurses)."""


class Line(str):
    """A whole line sent in place of a reply (``{"return": ...}``): what no QMP
    server sends, such as JSON that is not an object."""


class _Silent:
    """The type of :data:`SILENT`."""


#: Returned for a command: it is read and never answered (a server hung on it); as
#: the greeting, none is sent.
SILENT = _Silent()


def _encoded(value: object) -> str:
    return value if isinstance(value, Raw) else json.dumps(value)

#: A greeting of the right shape, as QEMU's.
GREETING: dict[str, Any] = {
    "QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": ""},
            "capabilities": []}}


#: What the shell asks for once connected, answered as by a server that has no commands.
INTROSPECTION: dict[str, object] = {"query-qmp-schema": [], "query-commands": []}


def _requests(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """The JSON objects the client sends, as QEMU reads them: a stream, with or
    without line feeds between them (qemu.qmp sends none)."""
    decoder = json.JSONDecoder()
    pending = ""
    while chunk := conn.recv(65536):
        pending += chunk.decode()
        while pending.strip():
            try:
                request, end = decoder.raw_decode(pending.lstrip())
            except ValueError:
                break  # not whole yet
            pending = pending.lstrip()[end:]
            yield request


def _serve(conn: socket.socket, greeting: object, returns: Mapping[str, object]) -> None:
    # The client may go at any point (it gives up on what it was sent).
    with conn, contextlib.suppress(OSError):
        if greeting is not SILENT:
            conn.sendall(_encoded(greeting).encode() + b"\r\n")
        for request in _requests(conn):
            answer = returns.get(str(request.get("execute")), {})
            if answer is SILENT:
                continue
            if isinstance(answer, Line):
                conn.sendall(answer.encode() + b"\r\n")
                continue
            returned = _encoded(answer)
            tail = f', "id": {json.dumps(request["id"])}' if "id" in request else ""
            # surrogateescape: a Raw's lone surrogates (U+DCE9) go as the bytes
            # they stand for (0xE9), which are not UTF-8.
            conn.sendall(f'{{"return": {returned}{tail}}}\r\n'.encode("utf-8", "surrogateescape"))


def _accept(server: socket.socket, greeting: object, returns: Mapping[str, object]) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # closed: the test is over
            return
        threading.Thread(target=_serve, args=(conn, greeting, returns), daemon=True).start()


@contextlib.contextmanager
def serving(path: Path, greeting: object = None,
            returns: Mapping[str, object] | None = None) -> Iterator[None]:
    """Listen on ``path`` for the block: greet each client with ``greeting``
    (default :data:`GREETING`; :data:`SILENT`: none), then answer each request with
    ``{"return": R}``, R being ``returns[command]`` (by default
    :data:`INTROSPECTION`'s, else ``{}``), and its ``id``; nothing when R is
    :data:`SILENT`."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    thread = threading.Thread(
        target=_accept, daemon=True,
        args=(server, GREETING if greeting is None else greeting,
              {**INTROSPECTION, **(returns or {})}))
    thread.start()
    try:
        yield
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join()
