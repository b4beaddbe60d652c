"""The server's HTTP limits, below the API: a request-body size limit and a deadline for receiving a request.

    app = BodyLimit(app, max_bytes, reject)          # 413 before the body is read (server.create_app adds it)
    uvicorn.run(app, http=read_deadline_protocol(30.0), ...)   # what example/serve.py runs

BodyLimit answers a declared Content-Length over the limit at once, without reading a byte of the body, and counts
a body without a declared length (chunked) as it arrives, keeping at most max_bytes of it. The read deadline closes
a connection whose request (headers and body) is not complete within the given seconds of its first byte (or of
the connection's start): a slow or stalled client cannot hold a connection open forever (uvicorn has no such
timeout for an unfinished request; its keep-alive timeout covers only the idle time between requests).
"""
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_LOG = logging.getLogger("uvicorn.error")  # the server log
DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # a full 4096-token context of any text is far below this
DEFAULT_READ_TIMEOUT = 30.0  # seconds to send one whole request


class BodyLimit:
    """ASGI middleware: bodies over max_bytes get reject(size_or_None) (an ASGI response) instead of the app."""

    def __init__(self, app, max_bytes, reject):
        self.app, self.max_bytes, self.reject = app, int(max_bytes), reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            # h11 delivers exactly the declared bytes, so a declared length within the limit needs no counting
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self.reject(int(declared))(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:  # no declared length: read up to the limit, then hand the app what was read
            message = await receive()
            if message["type"] != "http.request":  # the client left
                await self.app(scope, _replay([message], receive), send)
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self.reject(None)(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)


def _replay(messages, receive):
    """A receive() that returns `messages` first, then the connection's own (e.g. http.disconnect)."""
    queue = list(messages)

    async def replayed():
        return queue.pop(0) if queue else await receive()
    return replayed


def read_deadline_protocol(seconds):
    """uvicorn's h11 protocol class with a deadline of `seconds` for receiving each whole request."""

    class ReadDeadlineH11(H11Protocol):
        """H11Protocol that closes a connection whose request does not arrive in time (408 when the headers are
        unfinished). The clock starts at the connection's start or at the first byte of a request."""
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data):
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                self._arm()
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the whole request is in
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self):
            self._deadline = None
            if self.transport.is_closing():
                return
            client = "%s:%d" % tuple(self.client[:2]) if self.client else "a client"
            unfinished = "headers" if self.conn.their_state is h11.IDLE else "body"
            _LOG.warning("closing the connection from %s: its request %s did not arrive within %g s "
                         "(--read_timeout)", client, unfinished, seconds)
            if self.conn.their_state is h11.IDLE:  # no request started: nothing of the app's to interrupt
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n"
                                     b"content-length: 0\r\n\r\n")
            self.transport.close()  # a request still being read sees http.disconnect

    return ReadDeadlineH11


__all__ = ["BodyLimit", "read_deadline_protocol", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_READ_TIMEOUT"]
