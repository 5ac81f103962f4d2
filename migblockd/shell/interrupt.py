"""Ctrl-C (SIGINT) for the shell, taken through the event loop.

``asyncio.run`` handles SIGINT with a plain ``signal.signal`` handler that
cancels the main task, and ``signal.signal`` handlers run in the main thread
between two bytecodes.  A signal that arrives after the loop last looked and
before it blocks in ``epoll_wait`` is handled only when the loop next wakes:
with nothing else to wake it (a script waiting for its next line on stdin, a
daemon that does not answer), never.  On a busy machine that was about one
Ctrl-C in fifty.  ``loop.add_signal_handler`` also points
``signal.set_wakeup_fd`` at the loop, whose ``epoll_wait`` then returns for
the signal whenever it comes.

What Ctrl-C does is what ``asyncio.run`` does, with one addition: while a
command runs in the interactive shell (:meth:`Interrupts.abandoning`), it
abandons that command and the prompt comes back (prompt_toolkit takes SIGINT
for itself while its prompt runs, and leaves Python's handler behind when the
line is read: the loop's is taken again for each command).  Otherwise the
first Ctrl-C cancels the main task (the shell closes its connection and exits
with status 130) and a second one, should closing hang, raises
KeyboardInterrupt at once.  Except between the interactive shell's commands
(:meth:`Interrupts.interactive`): a Ctrl-C the loop takes after a command's
task has ended (it came while a big reply was read and printed, say) is
dropped, as one at the prompt that follows drops the line; no key but Ctrl-D
ends the interactive shell.  There, Ctrl-\\ (SIGQUIT, while a command runs)
is taken as Ctrl-C, rather than let its default action end the shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Interrupts"]


class Interrupts:
    """The shell's one SIGINT handler, for the life of its event loop."""

    def __init__(self) -> None:
        self._main: asyncio.Task[Any] | None = None
        self._command: asyncio.Task[Any] | None = None
        #: The command task the last Ctrl-C abandoned.
        self.abandoned: asyncio.Task[Any] | None = None
        #: Ctrl-Cs that went to the shell itself rather than to a command.
        self.count = 0
        self._interactive = False
        #: Called for a Ctrl-C (or Ctrl-\\) the interactive shell drops: a plain
        #: prompt (a dumb terminal) is printed afresh, as the terminal drops the line.
        self.on_dropped: Callable[[], None] | None = None

    def install(self) -> None:
        """Take SIGINT for the running loop; call from the main task.  Where the
        loop cannot take signals (not the main thread), Python's own handling stays."""
        self._main = asyncio.current_task()
        self._take()

    def uninstall(self) -> None:
        if self._main is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            self._main = None

    @contextlib.contextmanager
    def abandoning(self, command: asyncio.Task[Any]) -> Iterator[None]:
        """Within this block, Ctrl-C cancels ``command`` instead of ending the shell."""
        self._take()  # back from prompt_toolkit, which had it while its prompt ran
        self._command = command
        try:
            yield
        finally:
            self._command = None

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        """Within this block (the interactive shell's prompt and commands), a Ctrl-C
        that no running command takes is dropped, and Ctrl-\\ (SIGQUIT) is Ctrl-C.

        While a command waits the terminal is in cooked mode, where Ctrl-\\ is
        SIGQUIT, whose default action ended the shell (with a core dump); at the
        prompt prompt_toolkit reads it as a key, which does nothing."""
        self._interactive = True
        quit_taken = False
        if self._main is not None:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, self._on_sigint)
                quit_taken = True
        try:
            yield
        finally:
            self._interactive = False
            if quit_taken:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGQUIT)

    def _take(self) -> None:
        if self._main is None:
            return
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._on_sigint)

    def _on_sigint(self) -> None:
        command = self._command
        if command is not None and not command.done():
            self.abandoned = command
            command.cancel()
            return
        if self._interactive:
            if self.on_dropped is not None:
                self.on_dropped()
            return  # the prompt comes back, or is there: nothing to end
        self.count += 1
        if self.count == 1 and self._main is not None and not self._main.done():
            self._main.cancel()
            return
        raise KeyboardInterrupt
