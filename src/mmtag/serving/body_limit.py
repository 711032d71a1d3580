"""An ASGI middleware that answers 413 to a request body over a size limit, whether the client
states its size (Content-Length: refused before a byte is read) or streams it in chunks
(refused once the limit is passed, so an upload is never spooled whole)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """`limit_for(path)` gives the largest body, in bytes, accepted on that path."""

    def __init__(self, app, limit_for: Callable[[str], float]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        stated = dict(scope["headers"]).get(b"content-length", b"")
        if stated.isdigit() and int(stated) > limit:
            return await self._refuse(send, int(stated), limit)
        state = {"seen": 0, "refused": False, "answered": False}

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    state["refused"] = True
                    raise BodyTooLarge  # stops the form parser; the answer is replaced below
            return message

        async def guarded_send(message):
            # once the body was refused, the app's own answer (a parse error) becomes the 413
            if not state["refused"]:
                return await send(message)
            if message["type"] == "http.response.start" and not state["answered"]:
                state["answered"] = True
                await self._refuse(send, state["seen"], limit)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if state["refused"] and not state["answered"]:
            await self._refuse(send, state["seen"], limit)

    @staticmethod
    async def _refuse(send, size: int, limit: float) -> None:
        body = json.dumps({"detail": f"the request body is over the limit of "
                                     f"{limit / 2**20:.1f} MB ({size / 2**20:.1f} MB or more)"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})
