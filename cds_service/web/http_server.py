"""The production HTTP server's own error answers and logs, in the service's formats.

Gunicorn answers a request it cannot parse (a bad request line, an over-long URI, too many or too
large headers, a broken chunked body) before the app sees it, with an HTML page, and logs the
offending text. This worker answers those with a JSON OperationOutcome instead and logs only the
error's class, so that every answer a client gets is JSON and no request text reaches the logs.
"""
from __future__ import annotations

import io
import logging
import selectors
import threading
import time
from functools import partial

import orjson
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from ..errors import operation_outcome

log = logging.getLogger("cds_service.http")

# the client errors gunicorn raises while parsing, and the status each gets (gunicorn's own choice)
_STATUS = [
    (http_errors.LimitRequestLine, 414, "URI Too Long", "too-costly"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "too-costly"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "not-supported"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "not-supported"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "forbidden"),
    (http_errors.ParseException, 400, "Bad Request", "invalid"),     # every other parse error
]


HEAD_DEADLINE_S = 10.0     # a client has this long to send its request line and headers
HEAD_MAX_BYTES = 1 << 20   # past this the parser decides (431/414), as it would anyway
BODY_READ_TIMEOUT_S = 10.0  # each body read waits at most this (the app bounds the whole body too)
# load shedding: a request that waited longer than this for a thread is answered 503 at once (its client has given
# up: EHRs wait seconds for a CDS service), and with more than BACKLOG_PER_THREAD requests per thread already
# waiting a new one is answered 503 before it queues. Either way with Retry-After, and the worker stays responsive.
SHED_AFTER_S = 10.0          # the default of CDS_SHED_AFTER
BACKLOG_PER_THREAD = 16


class JsonErrorWorker(ThreadWorker):
    """gthread, with three changes: a request's head (request line and headers) is read by the event
    loop without a thread (a client sending a byte a second holds no worker thread, and is answered
    408 after HEAD_DEADLINE_S); refusals are JSON; SIGTERM turns readiness false first."""

    def init_process(self):
        self._heads: dict = {}                 # conn -> (bytes so far, deadline)
        self._waiting = 0                      # requests handed to the thread pool and not yet started
        self._waiting_lock = threading.Lock()
        super().init_process()

    @property
    def shed_after(self) -> float:
        extensions = getattr(getattr(self, "wsgi", None), "extensions", None) or {}
        settings = extensions.get("cds", {}).get("settings")
        return settings.shed_after if settings is not None else SHED_AFTER_S

    def _submit(self, conn):
        """Hand a request to the thread pool, unless too many wait already (503 now, on the event loop)."""
        if self._waiting >= max(1, self.cfg.threads) * BACKLOG_PER_THREAD:
            self.nr_conns -= 1
            self._shed(conn, "backlog")
            return
        conn.queued_at = time.monotonic()
        with self._waiting_lock:
            self._waiting += 1
        super().enqueue_req(conn)

    def _shed(self, conn, why: str) -> None:
        log.warning("request shed", extra={"event": "http_shed", "status": 503, "error": why})
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(1.0)
            conn.sock.sendall(_json_answer(503, "Service Unavailable", "transient",
                                           "The service is overloaded: retry in a moment.", retry_after=1))
        except OSError:
            pass
        conn.close()

    def enqueue_req(self, conn):
        if self.cfg.is_ssl or getattr(conn, "is_http2", False):
            return self._submit(conn)          # TLS and HTTP/2 are read as gunicorn reads them
        buffered = conn.parser.unreader.buf.getvalue() if conn.parser is not None else b""
        if b"\r\n\r\n" in buffered:
            return self._submit(conn)          # a pipelined request already read in full
        if conn.parser is not None:
            conn.parser.unreader.buf = io.BytesIO()
        conn.sock.setblocking(False)
        self._heads[conn] = (bytearray(buffered), time.monotonic() + HEAD_DEADLINE_S)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _on_head_readable(self, conn, _client):
        data, deadline = self._heads[conn]
        try:
            chunk = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:                           # the client went away
            self._forget_head(conn)
            self.nr_conns -= 1
            conn.close()
            return
        data += chunk
        if b"\r\n\r\n" in data or len(data) >= HEAD_MAX_BYTES or data.startswith(b"PRI * HTTP/2"):
            self._forget_head(conn)
            conn.prebuffered = bytes(data)
            self._submit(conn)

    def _forget_head(self, conn) -> None:
        self._heads.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn, (_, deadline) in list(self._heads.items()):
            if now >= deadline:                 # too slow: 408, and the connection is closed
                self._forget_head(conn)
                self.nr_conns -= 1
                log.warning("request head not received in time", extra={"event": "http_error", "status": 408,
                                                                      "error": "SlowRequestHead"})
                try:
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(1.0)
                    conn.sock.sendall(_json_answer(408, "Request Timeout", "timeout",
                                                   "The request was not received in time."))
                except OSError:
                    pass
                conn.close()

    def handle(self, conn):
        queued = getattr(conn, "queued_at", None)
        if queued is not None:
            conn.queued_at = None
            with self._waiting_lock:
                self._waiting -= 1
            if time.monotonic() - queued > self.shed_after:
                self._shed(conn, "waited")     # its client has given up: answering now frees the thread
                return False                   # (gunicorn then counts the connection closed)
        data = getattr(conn, "prebuffered", None)
        if data is not None:
            conn.prebuffered = None
            conn.init()                         # blocking socket, HTTP/1 parser
            conn.parser.unreader.unread(data)
            conn.data_ready = True
            conn.sock.settimeout(BODY_READ_TIMEOUT_S)
        return super().handle(conn)


    def handle_exit(self, sig, frame):
        """SIGTERM: readiness turns false at once (a load balancer stops sending), then gunicorn stops
        accepting, finishes the requests in flight (graceful_timeout) and closes the listener."""
        extensions = getattr(getattr(self, "wsgi", None), "extensions", None)
        if extensions and "cds" in extensions:
            extensions["cds"]["draining"] = True
        super().handle_exit(sig, frame)

    def handle_error(self, req, client, addr, exc):
        status, reason, code = next(((s, r, c) for kind, s, r, c in _STATUS if isinstance(exc, kind)),
                                    (500, "Internal Server Error", "exception"))
        log.warning("request refused by the HTTP server", extra={"event": "http_error", "status": status,
                                                                  "error": type(exc).__name__})
        text = "The service could not process this request." if status == 500 else f"{reason}."
        try:
            client.sendall(_json_answer(status, reason, code, text))
        except OSError:
            pass                                    # the client is gone: nothing to answer


def _json_answer(status: int, reason: str, code: str, text: str, retry_after: int | None = None) -> bytes:
    body = orjson.dumps(operation_outcome(text, code))
    retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n{retry}"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n\r\n").encode("latin-1")
    return head + body


def log_config(level: str) -> dict:
    """Gunicorn's own loggers write JSON lines through the service's formatter."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "cds_service.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
    }
