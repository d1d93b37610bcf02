"""Which requests the app answers at all, decided before any route runs: Host names the server was bound to
(DNS rebinding), same-site writes only (CSRF), one framing of a body (request smuggling); and each browser's
client token, so that its history is its own. A plain ASGI middleware: it costs a request a few dictionary
lookups, where a flood of page requests would otherwise pay for a task group each."""

from __future__ import annotations

import hashlib
import re
import secrets
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLIENT_COOKIE = "alldetect_client"  # a random token per browser: whose requests /history shows
COOKIE_SECONDS = 365 * 86400
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


class SameOriginOnly:
    """Refuse Host names outside ``allowed_hosts`` (None: any), cross-origin writes and bodies framed twice;
    put the hash of the browser's client token in ``request.state.client`` (the record keeps no usable token),
    giving a browser without one a new one."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] | None = None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope["method"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        token = cookie_parser(headers.get("cookie", "")).get(CLIENT_COOKIE, "")
        fresh = _TOKEN.fullmatch(token) is None
        if fresh:
            token = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["client"] = hashlib.sha256(token.encode()).hexdigest()
        if not fresh:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("set-cookie", _cookie(token))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _refusal(self, method: str, headers: Headers) -> Response | None:
        host = headers.get("host", "")
        if "transfer-encoding" in headers and "content-length" in headers:
            # two framings of one body: which one a proxy in front believed is unknowable
            return JSONResponse({"detail": "a request may give Transfer-Encoding or Content-Length, not both"},
                                status_code=400)
        if self.allowed_hosts is not None and hostname(host) not in self.allowed_hosts:
            return JSONResponse({"detail": f"host {host!r} is not served here; start `alldetect serve` with "
                                           "--allow-host for the names clients use"}, status_code=421)
        origin = headers.get("origin")
        if method not in ("GET", "HEAD", "OPTIONS") and origin is not None and \
                urlsplit(origin).netloc.lower() != host.lower():
            return JSONResponse({"detail": f"cross-origin request from {origin!r} refused"}, status_code=403)
        return None


def hostname(host: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1")."""
    return urlsplit(f"//{host}").hostname or ""


def _cookie(token: str) -> str:
    response = Response()
    response.set_cookie(CLIENT_COOKIE, token, httponly=True, samesite="strict", max_age=COOKIE_SECONDS)
    return response.headers["set-cookie"]
