"""A fault-injecting HTTP reverse proxy for S3 tests (loopback only).

``FaultProxy(upstream)`` listens on ``127.0.0.1`` (an ephemeral port) and forwards
every request (method, raw path and query, headers, body) to ``upstream``, returning
its status, headers and body. It runs an aiohttp server on its *own* thread and event
loop, so it works from sync tests, async tests and for child processes alike.

Two ways to break things:

* seeded random faults on a share of requests (``rate``): ``reset`` (close the
  connection without answering), ``500`` (InternalError), ``503`` (SlowDown),
  ``truncate`` (GET only: full ``Content-Length``, part of the body, then close) and
  ``delay`` (up to ``max_delay`` seconds, then forward). ``kinds`` picks the enabled
  ones, ``max_faults`` caps the total. Counted in :attr:`FaultProxy.faults`.
* rules: ``proxy.add_rule(predicate, action, times=None)``. The first rule whose
  predicate accepts a :class:`Request` (and has uses left) decides; matched requests
  get no random fault. Actions: :class:`Respond` (an S3 error), :class:`Reset`,
  :class:`CutBody` (mid-upload), :class:`ForwardThenReset` (the request takes effect, the client never learns),
  :class:`Truncate`, :class:`Delay` and :class:`Hold` (block until the test
  releases it, then drop or forward). :attr:`FaultProxy.log` records every exchange.

Everything is bounded: request bodies (``max_body``), upstream calls
(``upstream_timeout``), holds (``Hold(timeout=...)``, then dropped), the log and
:meth:`FaultProxy.stop`.
"""

from __future__ import annotations

import asyncio
import collections
import io
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

__all__ = [
    "ALL_KINDS",
    "CutBody",
    "Delay",
    "FaultProxy",
    "ForwardThenReset",
    "Hold",
    "Request",
    "Reset",
    "Respond",
    "Truncate",
]

ALL_KINDS = ("reset", "500", "503", "truncate", "delay")

# hop-by-hop or recomputed headers: never copied across the proxy
_SKIP_REQUEST = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te", "upgrade"}
_SKIP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length"}
_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/")


def s3_error_body(code: str, message: str, resource: str = "") -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()


@dataclass(frozen=True)
class Request:
    """What a rule's predicate sees (``path`` and ``query`` are raw, as sent)."""

    method: str
    path: str
    query: str
    headers: Any  # case-insensitive mapping

    @property
    def access_key_id(self) -> str | None:
        """The access key id of the SigV4 ``Authorization`` header's ``Credential``."""
        m = _CREDENTIAL_RE.search(self.headers.get("Authorization", ""))
        return m.group(1) if m else None


# ---------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Respond:
    """Answer with ``status`` and an S3 XML error ``code`` (no body for HEAD)."""

    status: int
    code: str
    message: str = "injected by faultproxy"


@dataclass(frozen=True)
class Reset:
    """Close the connection without answering; nothing reaches the upstream."""


@dataclass(frozen=True)
class CutBody:
    """Read the first ``after`` bytes of the request body, then close the connection:
    the client is cut off mid-upload and nothing reaches the upstream."""

    after: int


@dataclass(frozen=True)
class ForwardThenReset:
    """Forward to the upstream (the request takes effect), then close without answering."""


@dataclass(frozen=True)
class Truncate:
    """Forward; answer with the full ``Content-Length`` but only part of the body, then
    close the connection (applies to 200/206 answers with a body; others pass)."""


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds``, then forward (or, with ``then="reset"``, drop)."""

    seconds: float
    then: str = "forward"


class Hold:
    """Block matching requests until :meth:`release` (at most ``timeout`` s, then drop).

    ``arrived`` is set when the first matching request is held (its body fully read);
    ``held`` counts them. ``release(forward=False)`` drops every held request (the
    connection is closed, nothing reaches the upstream) and every later match;
    ``release(forward=True)`` forwards them and answers the client if it is still there.
    """

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self.arrived = threading.Event()
        self.held = 0
        self._decision: bool | None = None  # True: forward, False: drop
        self._events: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    def release(self, forward: bool = False) -> None:
        with self._lock:
            self._decision = forward
            events, self._events = self._events, []
        for loop, event in events:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def _wait(self) -> bool:
        """In the proxy loop: wait for the decision; True means forward."""
        event = asyncio.Event()
        with self._lock:
            self.held += 1
            decided = self._decision is not None
            if not decided:
                self._events.append((asyncio.get_running_loop(), event))
        self.arrived.set()
        if not decided:
            try:
                await asyncio.wait_for(event.wait(), self.timeout)
            except TimeoutError:
                return False
        return bool(self._decision)


Action = Respond | Reset | CutBody | ForwardThenReset | Truncate | Delay | Hold


@dataclass
class Rule:
    predicate: Callable[[Request], bool]
    action: Action
    times: int | None = None  # None: unlimited
    hits: int = 0


@dataclass(frozen=True)
class Exchange:
    """One finished request, as recorded in :attr:`FaultProxy.log`."""

    method: str
    path: str
    query: str
    status: int | None  # None: the client got no (complete) response
    outcome: str  # "forwarded", a fault kind, or a rule action's name
    at: float = 0.0  # time.monotonic() when it finished


# ---------------------------------------------------------------------------- proxy


@dataclass
class FaultProxy:
    upstream: str
    seed: int = 0
    rate: float = 0.0
    kinds: tuple[str, ...] = ALL_KINDS
    max_faults: int | None = None
    max_delay: float = 0.05
    max_body: int = 64 << 20
    upstream_timeout: float = 60.0

    requests: int = field(default=0, init=False)
    active: int = field(default=0, init=False)  # requests being handled (held ones too)
    faults: collections.Counter[str] = field(default_factory=collections.Counter, init=False)
    log: collections.deque[Exchange] = field(default_factory=lambda: collections.deque(maxlen=100_000), init=False)
    errors: list[BaseException] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self._rng = random.Random(self.seed)
        self._rules: list[Rule] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._error: BaseException | None = None
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.port is not None, "proxy not started"
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"fault proxy did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Drop held requests, close the server and its thread."""
        self.clear_rules()
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("fault proxy thread did not stop")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start(); never leaks from the thread
            self._error = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=64)
        timeout = aiohttp.ClientTimeout(total=self.upstream_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            self._session = session
            app = web.Application(client_max_size=self.max_body)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self.port = runner.addresses[0][1]
                self._ready.set()
                await self._stopping.wait()
            finally:
                await runner.cleanup()

    # -- configuration (from any thread) -----------------------------------------

    def add_rule(self, predicate: Callable[[Request], bool], action: Action, *, times: int | None = None) -> Rule:
        rule = Rule(predicate, action, times)
        with self._cond:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._cond:
            rules, self._rules = self._rules, []
        for rule in rules:
            if isinstance(rule.action, Hold):
                rule.action.release(forward=False)

    def wait_for(self, predicate: Callable[[list[Exchange]], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(log)`` is true (re-checked after every exchange)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self.log)), timeout)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no request is being handled (e.g. after killing a client)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.active == 0, timeout)

    # -- the handler -----------------------------------------------------------------

    def _match(self, req: Request) -> Rule | None:
        with self._cond:
            for rule in self._rules:
                if (rule.times is None or rule.hits < rule.times) and rule.predicate(req):
                    rule.hits += 1
                    return rule
        return None

    def _pick_fault(self, method: str) -> str | None:
        """One seeded draw per request: which fault, if any."""
        with self._cond:
            roll, pick = self._rng.random(), self._rng.random()
            if roll >= self.rate or (self.max_faults is not None and sum(self.faults.values()) >= self.max_faults):
                return None
            kinds = [k for k in self.kinds if k != "truncate" or method == "GET"]
            return kinds[int(pick * len(kinds))] if kinds else None

    def _record(self, req: Request, status: int | None, outcome: str, fault: str | None = None) -> None:
        with self._cond:
            if fault is not None:
                self.faults[fault] += 1
            self.log.append(Exchange(req.method, req.path, req.query, status, outcome, time.monotonic()))
            self._cond.notify_all()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._cond:
            self.requests += 1
            self.active += 1
        try:
            return await self._handle_one(request)
        except ConnectionError:  # the client went away (a killed child): not a proxy bug
            raise
        except Exception as exc:  # a proxy bug, not an injected fault: tests check .errors
            with self._cond:
                self.errors.append(exc)
            raise
        finally:
            with self._cond:
                self.active -= 1
                self._cond.notify_all()

    async def _handle_one(self, request: web.Request) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        req = Request(request.method, path, query, request.headers)
        rule = self._match(req)
        if rule is not None and isinstance(rule.action, CutBody):
            await request.content.read(rule.action.after)
            return self._reset(request, req, "cut-body")
        body = await request.read()
        action = rule.action if rule is not None else None
        fault = self._pick_fault(req.method) if rule is None else None

        if isinstance(action, Hold):
            forward = await action._wait()
            if not forward:
                return self._reset(request, req, "hold-drop")
            action = None
        if isinstance(action, Delay) or fault == "delay":
            seconds = action.seconds if isinstance(action, Delay) else self._rng.uniform(0, self.max_delay)
            await asyncio.sleep(seconds)
            if isinstance(action, Delay) and action.then == "reset":
                return self._reset(request, req, "delay-reset")
        if isinstance(action, Reset) or fault == "reset":
            return self._reset(request, req, "reset", fault)
        if isinstance(action, Respond) or fault in ("500", "503"):
            status, code, message = (
                (action.status, action.code, action.message)
                if isinstance(action, Respond)
                else (500, "InternalError", "We encountered an internal error. Please try again.")
                if fault == "500"
                else (503, "SlowDown", "Please reduce your request rate.")
            )
            self._record(req, status, f"respond-{code}", fault)
            err = b"" if req.method == "HEAD" else s3_error_body(code, message, req.path)
            return web.Response(status=status, body=err, content_type="application/xml")

        status, headers, payload = await self._forward(request, body)
        if isinstance(action, ForwardThenReset):
            return self._reset(request, req, "forward-reset")
        if (fault == "truncate" or isinstance(action, Truncate)) and status in (200, 206) and len(payload) >= 2:
            return await self._truncate(request, req, status, headers, payload)
        applied = "delay" if fault == "delay" else None  # a truncate that did not apply is no fault
        self._record(req, status, applied or "forwarded", applied)
        return web.Response(status=status, headers=headers, body=payload if req.method != "HEAD" else None)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        url = URL(self.upstream.rstrip("/") + request.raw_path, encoded=True)
        data = io.BytesIO(body) if body else None  # (aiohttp warns about large raw bytes)
        assert self._session is not None
        async with self._session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False, skip_auto_headers=("User-Agent",)
        ) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE}
            if request.method == "HEAD" and "Content-Length" in resp.headers:  # the object's size, no body
                out["Content-Length"] = resp.headers["Content-Length"]
            return resp.status, out, payload

    def _reset(self, request: web.Request, req: Request, outcome: str, fault: str | None = None) -> web.Response:
        self._record(req, None, outcome, fault)
        if request.transport is not None:
            request.transport.abort()  # RST-like close; aiohttp ignores the response below
        return web.Response(status=500)

    async def _truncate(
        self, request: web.Request, req: Request, status: int, headers: dict[str, str], payload: bytes
    ) -> web.StreamResponse:
        self._record(req, status, "truncate", "truncate")
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(payload)
        await resp.prepare(request)
        cut = self._rng.randrange(1, len(payload))
        await resp.write(payload[:cut])
        if request.transport is not None:
            request.transport.abort()
        return resp

    def summary(self) -> str:
        """A one-line summary for assertion messages."""
        with self._cond:
            return f"{self.requests} requests, faults {dict(self.faults)}"
