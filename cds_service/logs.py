"""Structured JSON logs, one line per event. Never log request bodies, identifiers, codes or tokens."""
from __future__ import annotations

import logging
import sys
import time

import orjson

# LogRecord attributes that are not ours
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _STANDARD:
                out[k] = v
        if record.exc_info:
            out["error"] = record.exc_info[0].__name__ if record.exc_info[0] else "error"
        return orjson.dumps(out, default=str).decode()


def configure(level: str = "INFO") -> None:
    root = logging.getLogger("cds_service")
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # urllib3 logs the URLs it fetched (a FHIR search names the patient): never let those lines out
    noisy = logging.getLogger("urllib3")
    noisy.setLevel(logging.CRITICAL)
    noisy.propagate = False
