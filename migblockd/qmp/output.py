"""A QMP session's output: the lines queued for the client, and those held for a commit.

Part of :class:`migblockd.qmp.session.Session` (a base class of it, holding no
slots of its own: two bases cannot both lay out slots, and
:class:`~migblockd.qmp.envelope.Envelope` holds its own).  Replies
(:meth:`Output.reply`, :meth:`Output.fail`) and events
(:func:`fan_out`, to every client at once) are queued as encoded lines, in the order they
are given; :meth:`Output.take_output` hands them to whoever writes them, with
their size and how much of it is events (what ``--max-output`` bounds).

Holding: the core may ask for output to be *held* (a ``stamp`` > 0) until
the change it depends on is on disk; everything queued after held output is
held too, so order never changes.  :meth:`Output.release` lets it go;
:meth:`Output.fail_held` turns it into what the client must hear instead when
the disk refused: the replies of the failed commands become errors, their
events vanish, everything else goes out unchanged.

Unread events (:meth:`Output.judge_unread`): a client that leaves more than
``--max-output`` bytes of events unread is dropped, unless it holds
connection-scoped blockers, which its drop would release: another user's
traffic must not lift a blocker.  Such a client is kept, and events to it are
discarded, not queued, until it is back within the bound: memory stays bounded
either way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

from migblockd.qmp.encoding import (
    Parts,
    encode_error,
    encode_return,
    encode_return_parts,
)
from migblockd.qmp.envelope import Request
from migblockd.qmp.errors import NO_ID, QMPError

__all__ = ["DISCARD", "DROP", "EVENT", "KEEP", "RESUME", "VANISH", "Applied", "Output",
           "Recipient", "fan_out"]

#: What held output becomes if its commit fails: sent as it is (a reply, or an
#: event), or dropped (the event of a change that never happened).  A reply
#: that must become an error carries its request instead.
KEEP: Final = "keep"
EVENT: Final = "event"
VANISH: Final = "vanish"

#: What :meth:`Output.judge_unread` decides about a client's unread events.
DROP: Final = "drop"
DISCARD: Final = "discard"
RESUME: Final = "resume"


class Applied:
    """The fate of a held reply whose command made a change elsewhere too (QEMU
    applied what migblockd forwarded): if its commit fails, the error says what
    stays applied there, in ``applied``'s words, not that nothing was changed."""

    __slots__ = ("applied", "request")

    def __init__(self, request: Request, applied: str) -> None:
        self.request = request
        self.applied = applied


class _Held:
    """The output held for one stamp, in order.

    Releasing moves whole runs (one ``list.extend``), not line by line: while
    a commit is in flight, every client holds one event line per change.
    Most of them are events of durable changes (VANISH), so only the other
    lines' fates are written down, and sizes are counted on release.
    """

    __slots__ = ("data", "fates", "replies", "stamp")

    def __init__(self, stamp: int) -> None:
        self.stamp = stamp
        self.data: list[bytes] = []
        #: The fate of each line that is not VANISH, by its index in ``data``.
        self.fates: dict[int, object] = {}
        self.replies = 0  # bytes of the lines that are not events


class Recipient(Protocol):
    """What :func:`fan_out` needs of a connection (``migblockd.connection.Connection``)."""

    @property
    def session(self) -> Output: ...

    @property
    def closed(self) -> bool: ...


R = TypeVar("R", bound=Recipient)


def fan_out(recipients: Iterable[R], line: bytes, stamp: int, durable: bool,
            mark: dict[R, None]) -> int:
    """Queue the pre-encoded event ``line`` on the session of every recipient
    that is not closed and has negotiated (none goes out before negotiation);
    each of those is added to ``mark`` (one that discards events too: its flush
    sees whether it has read again).  Returns for how many of them it was
    discarded.

    Every event goes to every client: with the queuing inlined here, rather
    than a method call per client, an add or delete at 16 clients takes about
    4% fewer instructions (in memory; 1% durable).
    """
    size = len(line)
    discarded = 0
    for recipient in recipients:
        session = recipient.session
        if session.negotiated and not recipient.closed:
            if session.discarding:
                session.missed += 1
                discarded += 1
                mark[recipient] = None
                continue
            held = session._held
            if stamp or held:
                run = held[-1] if held and held[-1].stamp >= stamp else session._hold(stamp)
                if not durable:
                    run.fates[len(run.data)] = EVENT
                run.data.append(line)
            else:
                session._output.append(line)
                session.output_bytes += size
                session.event_bytes += size
            mark[recipient] = None
    return discarded


class Output:
    """The output side of a :class:`~migblockd.qmp.session.Session`: what its client is sent."""

    # Set in Session.__init__, in slots of Session's: of two bases, only one may
    # lay out slots, and Envelope's are laid out.  Hidden from mypy, which would
    # otherwise refuse every assignment below for names not in these.
    if not TYPE_CHECKING:
        __slots__ = ()

    _output: list[bytes]
    #: Bytes in the output ready to send, and how many of them are events:
    #: what a client that does not read lets pile up (its replies are
    #: bounded by backpressure; see the server's max-output rule).
    output_bytes: int
    event_bytes: int
    #: Output waiting for a commit, oldest stamp first.
    _held: deque[_Held]
    negotiated: bool  # Envelope's: no events go out before negotiation
    #: Events to this client are discarded, not queued (:meth:`judge_unread`),
    #: and how many were since that began.
    discarding: bool
    missed: int

    # -- queuing -------------------------------------------------------------
    def reply(self, request: Request, result: object, stamp: int = 0,
              durable: bool = False, applied: str = "") -> None:
        """Answer ``request`` with its return value (``{}`` for commands without one).

        ``stamp`` > 0 holds the reply until :meth:`release` reaches it;
        ``durable`` says the command changed what is on disk, so that a failed
        commit turns this reply into an error; ``applied``, what the command
        changed that such a failure does not take back (see :class:`Applied`).
        """
        if type(result) is Parts:
            pieces = encode_return_parts(result, request.id)
            if not (stamp or self._held):  # a big listing: its pieces, unjoined
                self._output.extend(pieces)
                self.output_bytes += sum(map(len, pieces))
                return
            data = b"".join(pieces)
        else:
            data = encode_return(result, request.id)
        fate: object = KEEP
        if durable:
            fate = Applied(request, applied) if applied else request
        self._put(data, stamp, fate)

    def fail(self, request: Request | None, error: QMPError, stamp: int = 0,
             durable: bool = False) -> None:
        """Answer ``request`` with an error (None: a reply without ``id``);
        ``stamp`` and ``durable`` as for :meth:`reply`."""
        self._put(encode_error(error, NO_ID if request is None else request.id), stamp,
                  request if durable and request is not None else KEEP)

    def judge_unread(self, unread: int, limit: int, kept: Callable[[], bool]) -> str | None:
        """The client has ``unread`` bytes of events unread, of a bound of ``limit``.

        Past it, :data:`DROP` it, unless ``kept()`` (it holds connection-scoped
        blockers, which its drop would release): then :data:`DISCARD` says events
        to it are discarded from now on (:attr:`discarding`), once per episode.
        Back within it, :data:`RESUME`: events are queued again, and
        :attr:`missed` says how many it missed.  None: nothing changes.
        ``kept`` is asked once per episode at most (the blockers are sorted).
        """
        if unread > limit:
            if self.discarding:
                return None
            if not kept():
                return DROP
            self.discarding = True
            self.missed = 0
            return DISCARD
        if self.discarding:
            self.discarding = False
            return RESUME
        return None

    def _hold(self, stamp: int) -> _Held:
        run = _Held(stamp)
        self._held.append(run)
        return run

    def _put(self, data: bytes, stamp: int, on_failure: object) -> None:
        held = self._held
        if stamp or held:
            # Stamps only grow; what is queued behind held output waits with it.
            run = held[-1] if held and held[-1].stamp >= stamp else self._hold(stamp)
            run.fates[len(run.data)] = on_failure
            run.data.append(data)
            run.replies += len(data)
        else:
            self._output.append(data)
            self.output_bytes += len(data)

    def _emit(self, data: bytes, on_failure: object) -> None:
        self._output.append(data)
        self.output_bytes += len(data)
        if on_failure is EVENT or on_failure is VANISH:
            self.event_bytes += len(data)

    def release(self, committed: int) -> bool:
        """Let held output through up to stamp ``committed``; True if any moved."""
        held = self._held
        if not held or held[0].stamp > committed:
            return False
        output = self._output
        while held and held[0].stamp <= committed:
            run = held.popleft()
            output.extend(run.data)
            size = sum(map(len, run.data))
            self.output_bytes += size
            self.event_bytes += size - run.replies
        return True

    @property
    def holds_reply(self) -> bool:
        """A reply (or an error) waits in held output."""
        return any(run.replies for run in self._held)

    def fail_held(self, error: QMPError,
                  partly: Callable[[str], QMPError] | None = None) -> int:
        """The commit failed: release held output as the client must now hear it.
        Returns how many replies became errors: ``error``, or for a command whose
        change elsewhere stays (:class:`Applied`), ``partly(applied)``."""
        failed = 0
        for run in self._held:
            fates = run.fates
            for n, data in enumerate(run.data):
                on_failure = fates.get(n, VANISH)
                if on_failure is KEEP or on_failure is EVENT:
                    self._emit(data, on_failure)
                elif isinstance(on_failure, Request):
                    self._emit(encode_error(error, on_failure.id), KEEP)
                    failed += 1
                elif isinstance(on_failure, Applied):
                    told = error if partly is None else partly(on_failure.applied)
                    self._emit(encode_error(told, on_failure.request.id), KEEP)
                    failed += 1
        self._held.clear()
        return failed

    @property
    def holding(self) -> bool:
        return bool(self._held)

    @property
    def held_replies(self) -> int:
        """Bytes of replies held for commits (a run per stamp: a few at most)."""
        return sum(run.replies for run in self._held)

    def refuse(self, error: QMPError) -> None:
        """Turn the connection away: ``error`` (no ``id``) replaces the greeting."""
        self._output[:] = [encode_error(error, NO_ID)]
        self.output_bytes = len(self._output[0])

    def has_output(self) -> bool:
        return bool(self._output)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call (greeting, replies, events), in order."""
        pieces, size, _ = self.take_output()
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        # The transport's accounting (migblockd.outbox) trusts the running count.
        assert len(data) == size, (len(data), size)
        return data

    def take_output(self) -> tuple[list[bytes], int, int]:
        """What :meth:`data_to_send` returns, in pieces, its size, and how many of
        its bytes are events."""
        output = self._output
        if not output:
            return [], 0, 0
        self._output = []
        size, events = self.output_bytes, self.event_bytes
        self.output_bytes = self.event_bytes = 0
        return output, size, events
