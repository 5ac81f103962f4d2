"""Running one input line: parse it, answer ``help`` locally, or check the request
against the daemon's schema, send it and show the reply.  Shared by the interactive
and the scripting modes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from migblockd.qapi.doc import SchemaDocs
from migblockd.shell import helptext
from migblockd.shell.check import LEAVING, check_request
from migblockd.shell.connection import Connection
from migblockd.shell.render import Renderer, visible
from migblockd.shell.syntax import Help, Request, parse_line
from migblockd.shell.words import ParseError

Write = Callable[[str], None]


@dataclass
class Runner:
    connection: Connection
    renderer: Renderer
    docs: SchemaDocs
    out: Write
    """Replies and help text."""
    err: Write
    """Parse errors and other local messages."""
    echo: Write | None = None
    """Where ``-v`` shows each request sent (None: not verbose)."""
    messages: Renderer | None = None
    """How ``err`` and ``echo`` text is rendered when they go to another stream than
    ``out`` (which may not be a terminal when ``out`` is); default: ``renderer``."""

    @property
    def _messages(self) -> Renderer:
        return self.messages if self.messages is not None else self.renderer

    async def run_line(self, line: str) -> bool:
        """Run ``line``; False if it failed (bad syntax, a command or argument the
        daemon does not have, unknown help topic, or an error reply).  Connection
        problems raise ConnectError / ConnectionLost."""
        try:
            parsed = parse_line(line, self.connection.schema.hint)
        except ParseError as err:
            self.err(self._messages.error(f"error: {err}"))
            return False
        if isinstance(parsed, Help):
            return self._help(parsed.topic)
        if not isinstance(parsed, Request):
            return True
        if not parsed.raw:
            problem = check_request(self.connection.schema, parsed.message)
            if problem is not None:
                if parsed.message.get("execute") in LEAVING and self.connection.held:
                    # Told how to end the shell, the operator must also be told what
                    # ending it takes away.
                    problem += ("; ending it deletes the blockers this shell added with "
                                f"scope=connection ({', '.join(self.connection.held)})")
                self.err(self._messages.error(f"error: {problem}"))
                return False
        if "id" in parsed.message and self.connection.awaits(parsed.message["id"]):
            # Its reply could not be told from the earlier one's, which would be
            # shown as this one's (and this one's dropped).
            self.err(self._messages.error(
                f"error: id {visible(json.dumps(parsed.message['id']))} is still awaited by an "
                "earlier request, whose reply has not come; give this one another id"))
            return False
        if ("exec-oob" in parsed.message and "id" not in parsed.message
                and self.connection.awaiting):
            # A reply without an id is taken for the oldest request not answered,
            # as in-band replies come in order; an exec-oob one is run ahead of the
            # requests queued (qmp-spec.rst: the client "needs to pass id with
            # out-of-band commands"), so its reply would be taken for the earlier
            # request's, and that one's, later, for its own.  The daemon, as QEMU,
            # takes it without an id: the shell must refuse it, or send other
            # bytes than were typed.
            self.err(self._messages.error(
                "error: an exec-oob request without an id cannot be told from the earlier "
                "request still awaited, whose reply has not come: give it an id"))
            return False
        if self.echo is not None:
            self.echo(self._messages.request(
                parsed.message if parsed.text is None else parsed.text))
        reply = await self.connection.execute(parsed.message, parsed.text)
        self.out(self.renderer.reply(reply))
        return "error" not in reply

    def _help(self, topic: str | None) -> bool:
        schema = self.connection.schema
        # The names are the server's (query-qmp-schema, query-commands): escaped like
        # its replies, so that a name cannot steer the terminal.
        if topic is None:
            self.out(visible(helptext.overview(schema, self.docs)))
            return True
        text = helptext.help_text(schema, self.docs, topic)
        if text is None:
            self.err(self._messages.error(f"error: {helptext.unknown_command(schema, topic)}"))
            return False
        self.out(visible(text))
        return True
