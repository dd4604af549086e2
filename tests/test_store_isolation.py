"""A stuck, locked or down feedback store costs feedback a 503 within about 2 s, and never delays
patient-view, /healthz or anything else (store calls run on their own bounded threads with deadlines)."""
from __future__ import annotations

import socket
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cds_service import create_app
from cds_service.fhir.bundles import request_from_bundle
from cds_service.config import Settings

from .conftest import AS_OF, ROOT, SERVICE_URL, issue_cards

sys.path.insert(0, str(ROOT))
from fixtures.generate import ICD, Patient  # noqa: E402

FEEDBACK = SERVICE_URL + "/feedback"
ENTRY = {"feedback": [{"card": "3f2b1c4e-9d8a-4b7c-8e6f-5a4b3c2d1e0f", "outcome": "overridden",
                       "outcomeTimestamp": "2026-06-30T10:00:00Z"}]}


def patient_view_body() -> dict:
    p = Patient("iso-1", age=64)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=900)
    return request_from_bundle(p.bundle())


def timed(fn):
    start = time.monotonic()
    out = fn()
    return out, time.monotonic() - start


class BlackHole:
    """A TCP server that accepts connections and never says a word: a frozen database."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def check_isolated(client):
    """Feedback: 503 with Retry-After in about 2 s; patient-view and /healthz meanwhile answer at once."""
    with ThreadPoolExecutor(10) as pool:
        posts = [pool.submit(timed, lambda: client.post(FEEDBACK, json=ENTRY)) for _ in range(10)]
        time.sleep(0.2)                       # the store threads are all stuck now
        view, view_s = timed(lambda: client.post(SERVICE_URL, json=patient_view_body()))
        health, health_s = timed(lambda: client.get("/healthz"))
        ready, _ = timed(lambda: client.get("/readyz"))
        results = [f.result() for f in posts]
    assert view.status_code == 200 and view.get_json()["cards"] and view_s < 1.5
    assert health.status_code == 200 and health_s < 0.5
    assert ready.status_code == 503 and ready.get_json()["store"] == "unavailable"
    for resp, seconds in results:
        assert resp.status_code == 503 and resp.headers["Retry-After"] and seconds < 3.0
        assert resp.get_json()["issue"][0]["code"] == "transient"
    return max(s for _, s in results)


def test_a_locked_sqlite_store(tmp_path):
    db = tmp_path / "feedback.sqlite3"
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), database_url=f"sqlite:///{db}",
                              snooze_secrets="s1-a-long-enough-hmac-key-abcdefgh", log_level="WARNING"))
    client = app.test_client()
    issue_cards(app, ENTRY["feedback"][0]["card"])
    assert client.get("/readyz").status_code == 200
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")                 # another process holds the write lock
    try:
        check_isolated(client)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    deadline = time.monotonic() + 10                                 # and it recovers by itself, once the
    while client.post(FEEDBACK, json=ENTRY).status_code != 200:      # calls that were waiting have ended
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_frozen_postgresql_store(tmp_path, postgres):
    url = postgres.new_database()
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), database_url=url,
                              snooze_secrets="s1-a-long-enough-hmac-key-abcdefgh", log_level="WARNING"))
    client = app.test_client()
    issue_cards(app, ENTRY["feedback"][0]["card"])
    assert client.post(FEEDBACK, json=ENTRY).status_code == 200
    store = app.extensions["cds"]["feedback"].store
    hole = BlackHole()
    store.url = f"postgresql://cds@127.0.0.1:{hole.port}/cds"       # the server stops answering
    store._local = threading.local()                                 # so every connection is new
    try:
        check_isolated(client)
    finally:
        hole.close()
    store.url = url
    store._local = threading.local()
    deadline = time.monotonic() + 10
    while client.post(FEEDBACK, json=ENTRY).status_code != 200:      # recovers once the stuck calls end
        assert time.monotonic() < deadline
        time.sleep(0.5)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_need_no_credentials(tmp_path, path):
    app = create_app(Settings(cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), log_level="WARNING",
                              auth="required", trusted_issuers='{"https://i.example": "https://i.example/jwks"}'))
    assert app.test_client().get(path).status_code == 200
