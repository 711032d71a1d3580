"""Who may talk to the service: the Host header it answers (DNS rebinding) and the API key.

* Bound to this machine only (127.0.0.1, localhost, ::1) the service needs no key, but it
  answers only requests addressed to those names: a web page elsewhere whose name resolves to
  127.0.0.1 (DNS rebinding) cannot use it from the browser of someone on this machine.
* Bound to any other address, every API request (all but the health check, the page and the
  docs, which hold no data) needs the key (`--api-key` or
  $MMTAG_API_KEY; sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`), compared in
  constant time; `--no-auth` opens it on purpose. Failed keys are counted and logged, at most
  once every 10 seconds.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

log = logging.getLogger("mmtag.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
KEY_ENV = "MMTAG_API_KEY"
# reached without the key: the health check, and the static page and API docs (they hold no
# data; the page asks for the key before it calls the API)
OPEN_PATHS = ("/healthz", "/", "/docs", "/openapi.json", "/docs/swagger-ui-bundle.js",
              "/docs/swagger-ui.css", "/docs/favicon.png")
_LOG_EVERY_S = 10.0


def is_loopback(host: str) -> bool:
    return host in LOOPBACK


def allowed_hosts(bind: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The Host header names the service answers: this machine's names, the address it is
    bound to, and `extra` (--allow-host; '*' for any). Bound to every address (0.0.0.0, ::)
    with no --allow-host, any name: the key guards it then."""
    if "*" in extra or (bind in ("0.0.0.0", "::") and not extra):
        return ["*"]
    return sorted({*LOOPBACK, "[::1]", bind, *extra})


def require_key(bind: str, key: str | None, no_auth: bool) -> str | None:
    """The key the service will ask for, or None; an error when it is bound beyond this
    machine with neither a key nor --no-auth."""
    if key is not None and not key.strip():
        raise ValueError(f"the API key is empty; set --api-key or ${KEY_ENV} to a secret")
    if key:
        return key
    if is_loopback(bind) or no_auth:
        return None
    raise ValueError(f"--host {bind} opens the service to other machines: give it a key "
                     f"(--api-key KEY or ${KEY_ENV}), or pass --no-auth to serve without one")


class ApiKeyCheck:
    """An ASGI middleware that answers 401 to a request without the right key."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()
        self.failed = 0
        self.last_log = 0.0
        self.last_client = ""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._ok(scope):
            return await self.app(scope, receive, send)
        self._count(scope)
        body = json.dumps({"detail": "missing or wrong API key: send it as 'Authorization: "
                                     "Bearer KEY' or 'X-API-Key: KEY'"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _ok(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given, self.key)  # constant time: no guessing by timing

    def _count(self, scope) -> None:
        self.failed += 1
        client = scope.get("client")
        self.last_client = client[0] if client else "?"
        now = time.monotonic()
        if now - self.last_log >= _LOG_EVERY_S:
            log.warning("%d request(s) refused for a missing or wrong API key (the last from "
                        "%s)", self.failed, self.last_client)
            self.failed, self.last_log = 0, now
