"""Connect, lose QEMU, reconnect, close: run by test_qemu_link.py under each Python.

Usage: ``python -X dev qemu_link_scenario.py GATE_SOCKET``.  Prints ``connected`` once
connected; the test then restarts QEMU on the same socket; once the link has reconnected
by itself, prints what two commands gave and the states the link went through, and exits.
stderr gets every log line at DEBUG level, except the link's wire trace and asyncio's
slow-callback warnings: so anything the library or asyncio would complain about shows.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable

from migblockd.qemu import LinkState, QemuCommandError, QemuLink


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def main(path: str) -> None:
    states: list[LinkState] = []
    link = QemuLink(path, on_state=states.append, min_delay=0.01, max_delay=0.1)
    link.start()
    await until(lambda: link.state == "connected", "connected")
    print("connected", flush=True)
    await until(lambda: states == ["connected", "disconnected", "connected"], "reconnected")
    try:
        await link.execute("no-such-command")
    except QemuCommandError as exc:
        print(f"{exc.error_class}: {exc}")
    print(f"query-migrate: {await link.execute('query-migrate')}")
    await link.close()
    print("states:", *states)


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG,
                        format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("migblockd.qemu").setLevel(logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    asyncio.run(main(sys.argv[1]))
    gc.collect()
