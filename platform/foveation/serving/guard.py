"""The ingress's ASGI middleware against slow, stalled and too many clients.

Ray Serve's HTTP proxy (uvicorn) hands a request to the ingress replica as soon as its headers
have arrived; the body then trickles through as the replica asks for it. A client that sends
headers and a few bytes of a large body, then nothing, held an ingress slot for as long as it
kept the socket open: 64 such connections (the old ``max_ongoing_requests``) stopped every
other request, ``/healthz`` included. Ray 2.60 offers no body or header timeout in the proxy
(``HTTPOptions`` has an end-to-end ``request_timeout_s`` and uvicorn's keep-alive only), and
an end-to-end limit would cut off a legitimate 40 MP upload on CPU. So here, per request:

- **idle body timeout**: each chunk of the body must arrive within
  ``limits.body_idle_timeout_s`` of the previous one; otherwise the read raises a 408
  ``RequestError`` (the app's JSON error), the answer goes out and uvicorn closes the
  connection (its body was not read to the end). Once the body is complete, reads pass
  through untouched (Starlette waits on them for a disconnect);
- **in-flight cap**: more than ``limits.max_in_flight`` requests in this replica get a JSON
  503 with ``Retry-After`` at once, before anything is read. The ingress's Serve
  ``max_ongoing_requests`` is set above it, so stalled requests wait cheaply here (an
  awaiting coroutine each) instead of filling Ray's slots;
- the request id (Ray's proxy puts ``x-request-id`` in the headers and on the answer) is
  what error bodies and log lines quote (``request_id``).

Authentication and body-size limits stay in the routes (``serve.app``), which check the
token before they read a byte of the body.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from foveation.serving.errors import RequestError

REQUEST_ID_HEADER = "x-request-id"
_SAFE_ID = re.compile(r"[^A-Za-z0-9._:-]")


def request_id_of(headers: Any) -> str:
    """The request's id (Ray's proxy sets one when the client did not), made safe to quote
    in a log line: at most 64 characters of [A-Za-z0-9._:-]."""
    rid = headers.get(REQUEST_ID_HEADER) or ""
    return _SAFE_ID.sub("", str(rid))[:64] or "-"


class RequestGuard:
    """Pure ASGI middleware (no Starlette ``BaseHTTPMiddleware``: it would buffer bodies).
    ``configure`` sets the limits when the ingress replica starts; until then requests pass
    through unguarded (the app's import, OpenAPI generation)."""

    # One ingress per process: the limits are the class's, set by the replica's constructor
    # (FastAPI builds its middleware instances itself, on the first request).
    max_in_flight: int | None = None
    idle_s: float = 10.0
    on_refused = None

    def __init__(self, app) -> None:
        self.app = app
        self.in_flight = 0

    @classmethod
    def configure(cls, max_in_flight: int, idle_s: float, on_refused=None) -> None:
        """``on_refused(status, code)``: counts a request refused here (metrics)."""
        cls.max_in_flight, cls.idle_s, cls.on_refused = max_in_flight, idle_s, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.max_in_flight is None:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            if RequestGuard.on_refused is not None:
                RequestGuard.on_refused(503, "overloaded")
            await _send_json(
                send,
                RequestError(503, "overloaded", "server busy; retry shortly"),
                _header(scope, REQUEST_ID_HEADER),
                retry_after=True,
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, _idle_limited(receive, self.idle_s), send)
        finally:
            self.in_flight -= 1


def _idle_limited(receive, idle_s: float):
    complete = False  # the whole body has arrived

    async def guarded():
        nonlocal complete
        if complete:
            return await receive()
        # Not asyncio.wait_for: it waits for the cancelled read to finish, and Serve's read (a
        # call back to the proxy) does not end until the client sends or hangs up.
        task = asyncio.ensure_future(receive())
        try:
            finished, _ = await asyncio.wait({task}, timeout=idle_s)
        except asyncio.CancelledError:  # the request was cancelled (its client went): no orphan
            task.cancel()
            raise
        if not finished:
            task.cancel()
            raise RequestError(
                408,
                "body_timeout",
                f"no part of the request body arrived for {idle_s:g} s; send it without pauses",
            )
        message = task.result()
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return guarded


def _header(scope, name: str) -> str:
    for k, v in scope.get("headers", ()):
        if k.decode("latin-1").lower() == name:
            return v.decode("latin-1")
    return ""


async def _send_json(send, err: RequestError, request_id: str, retry_after: bool) -> None:
    rid = _SAFE_ID.sub("", request_id)[:64] or "-"
    body = err.to_dict()
    body["error"]["request_id"] = rid
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
