"""Who may ask the viewer anything: the Host a request names, and (when the viewer is shared) its token or the
reverse proxy's authentication header. One ASGI middleware in front of every route, static files included.

- **Host**: a request whose ``Host`` header is not one of ``Access.allowed_hosts`` (loopback names by default,
  plus the bound host and ``histcode view --allowed-host``) gets 400 with the reason. A page on another site
  that rebinds its own name to 127.0.0.1 (DNS rebinding) sends its own name as Host, so it reads nothing.
- **Token** (``Access.token``; `histcode view --public` makes one, as Jupyter does): a request carries it as
  ``?token=...`` (which then sets a cookie, HttpOnly and SameSite=Lax, so the pages' own requests carry it),
  the cookie, or ``Authorization: Bearer ...``; compared in constant time. None: 401; a wrong one: 403.
- **Proxy header** (``Access.auth_header``): behind a reverse proxy that authenticates its users and sets a
  header (``X-Forwarded-User``, ``X-Auth-Request-Email``...), a request without that header is 401. The proxy
  must drop the header from what clients send; the viewer cannot tell who set it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_PARAM = "token"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the viewer on this machine: ``localhost`` or a loopback address."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The name in a ``Host`` header, lowercase, without its port or brackets (``[::1]:8765`` -> ``::1``)."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.index("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.rsplit(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` is one of ``allowed``; ``*.example.org`` admits its subdomains, ``*`` any host."""
    for pattern in allowed:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


@dataclass(frozen=True)
class Access:
    """What the middleware admits. The default: loopback Host names only, no token (a viewer on 127.0.0.1)."""

    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    token: str | None = None
    auth_header: str | None = None
    cookie: str = "histcode-viewer-token"

    def __post_init__(self) -> None:
        normal = tuple(dict.fromkeys(h.strip().lower().strip("[]").rstrip(".") for h in self.allowed_hosts if h.strip()))
        object.__setattr__(self, "allowed_hosts", normal)
        if self.auth_header is not None:
            object.__setattr__(self, "auth_header", self.auth_header.strip().lower())

    @property
    def authenticated(self) -> bool:
        return bool(self.token or self.auth_header)


class AccessMiddleware:
    """Host check, then the token or proxy header (``Access``), before any route is reached."""

    def __init__(self, app, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        access = self.access
        host = headers.get("host")
        if host is None:
            await self._refuse(scope, send, 400, "the request names no Host")
            return
        if not host_allowed(host_of(host), access.allowed_hosts):
            await self._refuse(scope, send, 400, f"this viewer does not answer for host {host_of(host)[:80]!r}: start "
                                                 "it with --allowed-host NAME to admit it")
            return
        set_cookie = None
        if access.authenticated:
            verdict, set_cookie = self._check(scope, headers)
            if verdict is not None:
                await self._refuse(scope, send, *verdict)
                return
        if set_cookie is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", set_cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _check(self, scope, headers: dict) -> tuple[tuple[int, str] | None, bytes | None]:
        """(refusal or None, a Set-Cookie value to add or None)."""
        access = self.access
        if access.auth_header and headers.get(access.auth_header, "").strip():
            return None, None
        if access.token:
            given, from_query = _token_of(scope, headers, access.cookie)
            if given is not None:
                if hmac.compare_digest(given.encode("utf-8", "replace"), access.token.encode("utf-8")):
                    cookie = None
                    if from_query:
                        cookie = f"{access.cookie}={access.token}; Path=/; HttpOnly; SameSite=Lax".encode("latin-1")
                    return None, cookie
                return (403, "wrong token for this viewer"), None
        if access.token and access.auth_header:
            need = f"its token (?token=... or Authorization: Bearer ...) or the {access.auth_header} header of its proxy"
        elif access.token:
            need = "its token: open the address `histcode view` printed (…/?token=…) or send Authorization: Bearer TOKEN"
        else:
            need = f"the {access.auth_header} header its authenticating proxy sets"
        return (401, f"this viewer needs {need}"), None

    async def _refuse(self, scope, send, status: int, reason: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": reason}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="histcode-viewer"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _token_of(scope, headers: dict, cookie_name: str) -> tuple[str | None, bool]:
    """The token a request carries (Authorization, then ``?token=``, then the cookie) and whether it came from the
    query string."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip(), False
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if name == TOKEN_PARAM:
            return value, True
    if "cookie" in headers:
        jar = SimpleCookie()
        try:
            jar.load(headers["cookie"])
        except Exception:  # noqa: BLE001 -- a malformed Cookie header carries no token
            return None, False
        if cookie_name in jar:
            return jar[cookie_name].value, False
    return None, False


__all__ = ["Access", "AccessMiddleware", "LOOPBACK_HOSTS", "host_allowed", "host_of", "is_loopback"]
