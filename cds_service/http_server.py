"""The production HTTP server's own error answers and logs, in the service's formats.

Gunicorn answers a request it cannot parse (a bad request line, an over-long URI, too many or too
large headers, a broken chunked body) before the app sees it, with an HTML page, and logs the
offending text. This worker answers those with a JSON OperationOutcome instead and logs only the
error's class, so that every answer a client gets is JSON and no request text reaches the logs.
"""
from __future__ import annotations

import logging

import orjson
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from .errors import operation_outcome

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


class JsonErrorWorker(ThreadWorker):
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
        body = orjson.dumps(operation_outcome(text, code))
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n\r\n").encode("latin-1")
        try:
            client.sendall(head + body)
        except OSError:
            pass                                    # the client is gone: nothing to answer


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
