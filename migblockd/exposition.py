"""The metrics endpoint's answer: the registry encoded on the event loop, spaced, gzipped.

The WSGI app that :mod:`migblockd.scrape`'s thread calls for each request:
prometheus_client's encoder (the Prometheus text format, or OpenMetrics when the
scraper asks; gzip when accepted) over the registry of :mod:`migblockd.metrics`,
run on the event loop, between two turns (``call_soon_threadsafe``; the thread
waits for it).  It is apart from the HTTP side (connections, their limits and
the socket), which never looks at what it serves.

Why not build it on the thread, which could read the counters without a
lock: the GIL.  While a thread formats an answer (a few milliseconds of pure
Python), the event loop, which releases the interpreter at every system
call, waits up to the switch interval (5 ms) to get it back, again and
again; ``benchmarks/bench_metrics.py`` measured add/del throughput falling
to a half, or a quarter, under a client scraping back to back.  On the loop,
a scrape costs the loop exactly its own time, sees one consistent state, and
needs nothing to be safe across threads.  A wedged loop shows as failed
scrapes (503 ``RENDER_TIMEOUT`` after the request, however many wait with it),
and failed probes: a HEAD waits for a turn of the loop as the GET does, though
it builds nothing.

Answers are spaced ``MIN_INTERVAL`` apart (a faster scraper waits), so
scraping never takes more than a few percent of the loop, however eager the
scraper.  Prometheus scrapes every 15 s or more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from migblockd.logs import shown
from migblockd.scrape_request import log_failure

__all__ = ["MIN_INTERVAL", "RENDER_TIMEOUT", "MetricsApp", "gzip_wanted"]

log = logging.getLogger("migblockd")

#: Seconds from one answer to the next at the least: bounds what scraping costs.
MIN_INTERVAL = 0.1
#: Seconds from a request to its 503 when the event loop has not built the answer
#: by then (waits for the answers before it included).
RENDER_TIMEOUT = 5.0

StartResponse = Callable[..., Any]

_LATE = "migblockd's event loop did not answer in time"
_STOPPING = "migblockd is stopping"

#: The text format 0.0.4: what prometheus_client answers when the scraper asks for
#: nothing else (its name for the content type differs between its versions).
_PLAIN = choose_encoder("")


class MetricsApp:
    """The WSGI app: ``registry`` encoded on ``loop``, one answer at a time, spaced."""

    def __init__(self, registry: CollectorRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = registry
        self.loop = loop
        self._lock = threading.Lock()
        self._ready = 0.0  # time.monotonic() from which the next answer may start
        # Set when the loop starts the last render given up on, if it has not yet.
        self._unstarted: threading.Event | None = None
        #: Set when the daemon stops: scrapes still waiting for their turn get
        #: their 503 at once, rather than the end of the process in its place.
        self.stopping = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method not in ("GET", "HEAD"):
            refused, allow, text = _plain("405 Method Not Allowed", "use GET",
                                          [("Allow", "GET, HEAD")])
            start_response(refused, allow)
            return [text]
        # HTTP's general-purpose servers take HEAD (RFC 9110, 9.1): an uptime
        # probe's.  Its answer is the GET's (9.3.2), so it waits for the event
        # loop as the GET does: a wedged or stopping daemon is not healthy.  Only
        # the body of a 200 is not built, which costs the loop.
        try:
            status, headers, body = self._answer(environ, build=method == "GET")
        except Exception:
            # A bug, which any client may set off once per request: throttled.
            log_failure("cannot build the answer", sys.exc_info())
            status, headers, body = _plain("500 Internal Server Error", "internal error")
        if method == "GET":
            assert body is not None  # built
            start_response(status, headers)
            return [body]
        if body is not None:
            # What the GET's length would be (wsgiref sets it for a body of one block).
            headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        # Not [], for which wsgiref says "Content-Length: 0": a HEAD answer must not
        # give a length other than the GET's (RFC 9110, 8.6), and a 200's is not
        # known without the build.  wsgiref gives none for an iterator.
        return iter([b""])

    def _answer(self, environ: dict[str, Any], *,
                build: bool) -> tuple[str, list[tuple[str, str]], bytes | None]:
        """The GET's status, headers and body; without ``build``, the body of a 200
        is None, not built (the loop still runs a turn for it, or the 503 says why not)."""
        encoder, content_type = _encoder(environ.get("HTTP_ACCEPT", ""))
        headers = [("Content-Type", content_type)]
        gzipped = gzip_wanted(environ.get("HTTP_ACCEPT_ENCODING", ""))
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        source: Collector = self.registry if names is None else _Only(self.registry, names)
        try:
            output = self._on_loop(lambda: encoder(source) if build else b"")
        except _NoAnswer as exc:
            return _plain("503 Service Unavailable", str(exc))
        if not build:
            return "200 OK", headers, None
        if gzipped:
            output = gzip.compress(output)
        return "200 OK", headers, output

    def _on_loop(self, make: Callable[[], bytes]) -> bytes:
        # RENDER_TIMEOUT counts from the request, its wait for the scrapes before
        # it included: on a wedged loop, scrapes that came together each waited a
        # whole RENDER_TIMEOUT for their own render in turn (503s at 5, 10, 15 s).
        deadline = time.monotonic() + RENDER_TIMEOUT
        if not self._lock.acquire(timeout=RENDER_TIMEOUT):
            raise _NoAnswer(_LATE)
        try:
            return self._render(make, deadline)
        finally:
            self._lock.release()

    def _render(self, make: Callable[[], bytes], deadline: float) -> bytes:
        """``make()`` run on the loop, by ``deadline``; under ``_lock``."""
        if self.loop.is_closed() or self.stopping.is_set():
            raise _NoAnswer(_STOPPING)
        unstarted = self._unstarted
        if unstarted is not None:
            # The loop has not started a render given up on before: one queued
            # behind it would not start either, and each scrape of a wedged loop
            # would leave one more for it to run once it turns.
            if not unstarted.wait(max(0.0, deadline - time.monotonic())):
                raise _NoAnswer(_LATE)
            self._unstarted = None
        wait = self._ready - time.monotonic()
        if wait > 0 and self.stopping.wait(wait):
            raise _NoAnswer(_STOPPING)
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        started = threading.Event()

        def run() -> None:
            started.set()
            if not future.set_running_or_notify_cancel():
                return  # given up on
            try:
                future.set_result(make())
            except Exception as exc:
                future.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: the daemon is stopping
            raise _NoAnswer(_STOPPING) from None
        try:
            return future.result(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if not started.is_set():
                self._unstarted = started
            raise _NoAnswer(_LATE) from None
        finally:
            future.cancel()
            self._ready = time.monotonic() + MIN_INTERVAL


def _encoder(accept: str) -> tuple[Callable[[Collector], bytes], str]:
    """prometheus_client's encoder for the format ``accept`` weighs most, and the
    Content-Type it answers with; for an ``Accept`` it cannot use, the text format
    0.0.4's, as a Prometheus server answers.

    ``choose_encoder`` is given a header of ours, never the client's: it takes
    the first format the client names, whatever its weight (``q=0`` included),
    compares names and parameters case-sensitively, and copies the version the
    client sent into the Content-Type, whatever it is (``version=99.0.0``, 64 KB of
    digits): the answer then claimed a format it is not in.
    """
    best: tuple[float, str] | None = None
    ranges = accept[:_ACCEPT_MAX].split(",")
    if len(accept) > _ACCEPT_MAX:
        # Read in pure Python, under the interpreter lock the event loop waits
        # for: 64 KB of commas took 80 ms.  Prometheus sends some 250 bytes.
        ranges.pop()  # cut short
    for media_range in ranges:
        offered = _offered(media_range)
        if offered is not None and (best is None or offered[0] > best[0]):
            best = offered  # ties: the first named, as the client lists its preference
    if best is None:
        if accept.strip() and log.isEnabledFor(logging.DEBUG):
            log.debug("metrics: Accept %s names no format served here: the text format "
                      "0.0.4", shown(accept))
        return _PLAIN
    return choose_encoder(best[1])


def _offered(media_range: str) -> tuple[float, str] | None:
    """(weight, the header prometheus_client is given) of one media range of an
    ``Accept`` header, if it names a format served here with a weight above 0."""
    kind, *pairs = (part.strip() for part in media_range.split(";"))
    kind = kind.lower()
    if kind not in _KINDS:
        return None
    params: dict[str, str] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        # Names are case-insensitive, a value may be quoted (RFC 9110, 5.6.6).
        params.setdefault(name.strip().lower(), value.strip().strip('"'))
    try:
        weight = float(params.get("q", "1"))
    except ValueError:
        return None  # a weight it cannot read: not a request for the format
    if not 0 < weight <= 1:
        return None  # q=0: "not acceptable" (RFC 9110, 12.4.2)
    named = params.get("version")
    version = None if named is None else _VERSION.fullmatch(named)
    if named is not None and version is None:
        return None  # a version it cannot read (version=x, 64 KB of digits)
    major = None if version is None else int(version[1])
    escaping = params.get("escaping", "")
    escaping = escaping if escaping in _ESCAPINGS else "underscores"
    if kind == "application/openmetrics-text" and major in (None, 1):
        # Written in OpenMetrics 1.0.0 (prometheus_client writes no other), which
        # is what a version 1.x reader reads.
        return weight, f"{kind}; version=1.0.0; escaping={escaping}"
    if kind == "text/plain" and major == 1:
        return weight, f"{kind}; version=1.0.0; escaping={escaping}"
    if kind in ("text/plain", "text/*", "*/*") and named in (None, "0.0.4"):
        return weight, ""  # the text format 0.0.4
    return None


#: The media ranges that may name a format served here.
_KINDS = frozenset({"application/openmetrics-text", "text/plain", "text/*", "*/*"})
#: Characters of an ``Accept`` header read at most; the media range cut there is not.
_ACCEPT_MAX = 1024
#: A version a format's parameter may name: up to three numbers, ASCII digits.
_VERSION = re.compile(r"([0-9]{1,4})(?:\.[0-9]{1,4}){0,2}", re.ASCII)
#: prometheus_client's names for the escaping of names outside the legacy
#: characters (none of migblockd's are): what else a client sends, it ignores.
_ESCAPINGS = frozenset({"allow-utf-8", "underscores", "dots", "values"})


def gzip_wanted(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` asks for gzip with a weight above 0.

    prometheus_client's own test looks for the word only, so it gzips for
    ``gzip;q=0``, which RFC 9110 (12.5.3) defines as "not acceptable".  A
    ``*`` is not taken as gzip: the plain answer is never wrong.
    """
    for coding in accept_encoding.split(","):
        name, *params = (part.strip() for part in coding.split(";"))
        if name.lower() not in ("gzip", "x-gzip"):
            continue
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0  # a weight it cannot read: not a request for gzip
        return weight > 0
    return False


class _NoAnswer(Exception):
    """The event loop could not build the answer; ``str()`` says why."""


class _Only(Collector):
    """The samples of ``registry`` named in ``names``, in their families, as
    prometheus_client's ``name[]`` filter answers (``RestrictedRegistry``): by
    sample name (``migblockd_blockers_added_total``, not the family's
    ``migblockd_blockers_added``; a histogram's ``_count`` without its buckets).
    The collectors here describe nothing in advance, so its own restricted
    registry would find none."""

    def __init__(self, registry: CollectorRegistry, names: list[str]) -> None:
        self.registry = registry
        self.names = frozenset(names)

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            samples = [sample for sample in family.samples if sample.name in self.names]
            if samples:
                only = Metric(family.name, family.documentation, family.type, family.unit)
                only.samples = samples
                yield only


def _plain(status: str, text: str, headers: list[tuple[str, str]] | None = None,
           ) -> tuple[str, list[tuple[str, str]], bytes]:
    """An answer of ``text`` in plain text: its status, headers and body."""
    return (status, [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])],
            f"{text}\n".encode())
