"""Feedback stores (embedded SQLite and a real PostgreSQL): nothing acknowledged is ever lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from cds_service import create_app
from cds_service.config import Settings
from cds_service.storage.feedback import open_store

from .conftest import AS_OF, ROOT, SERVICE_URL, issue_cards


def entry(card: str, comment: str | None = None) -> dict:
    return {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-06-30T10:00:00Z",
            "acceptedSuggestions": [], "reason": {"system": "s", "code": "already-evaluated"}, "userComment": comment}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


def test_concurrent_threads_lose_nothing_and_duplicates_are_idempotent(store_url):
    store = open_store(store_url)
    threads_n, per_thread = 16, 50
    errors = []

    def work(t: int):
        try:
            for i in range(per_thread):
                store.save("svc", [entry(f"t{t}-{i}")])
            store.save("svc", [entry("shared-1"), entry("shared-2")])      # every thread posts the same two
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count() == threads_n * per_thread + 2
    assert len(store.entries_for_card("shared-1")) == 1


WRITER = """
import sys
from cds_service.storage.feedback import open_store
store = open_store(sys.argv[1])
tag, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    stored = store.save("svc", [{"card": f"{tag}-{i}", "outcome": "overridden", "outcomeTimestamp": "2026-06-30T10:00:00Z",
                                 "acceptedSuggestions": [], "reason": None, "userComment": None},
                                {"card": f"dup-{i % 5}", "outcome": "overridden", "outcomeTimestamp": "2026-06-30T10:00:00Z",
                                 "acceptedSuggestions": [], "reason": None, "userComment": None}])
    print(f"{tag}-{i}", flush=True)          # acknowledged only after save() returned
"""


def test_concurrent_processes_lose_nothing(store_url):
    open_store(store_url)                              # schema first, as the app does at start-up
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store_url, f"p{n}", "100"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for n in range(4)]
    acked = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        acked += out.split()
    store = open_store(store_url)
    assert len(acked) == 400
    assert store.count() == 400 + 5                    # the duplicate cards are stored once


def test_a_killed_writer_loses_no_acknowledged_feedback(store_url):
    open_store(store_url)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, store_url, "k", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    acked = []
    while len(acked) < 150:
        line = proc.stdout.readline()
        assert line, "writer stopped early"
        acked.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)                  # mid-stream, no cleanup
    proc.wait(timeout=10)
    acked += [line.strip() for line in proc.stdout.read().split()]
    store = open_store(store_url)
    missing = [card for card in acked if not store.entries_for_card(card)]
    assert missing == []


def test_the_service_stores_feedback_in_postgresql(tmp_path, postgres):
    url = postgres.new_database()
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), database_url=url, log_level="WARNING"))
    body = {"feedback": [{"card": "pg-card", "outcome": "accepted", "acceptedSuggestions": [{"id": "s1"}],
                          "outcomeTimestamp": "2026-06-30T10:00:00Z"}]}
    client = app.test_client()
    issue_cards(app, "pg-card")
    assert client.post(SERVICE_URL + "/feedback", json=body).get_json() == {"stored": 1, "received": 1}
    assert client.post(SERVICE_URL + "/feedback", json=body).get_json() == {"stored": 0, "received": 1}
    assert open_store(url).entries_for_card("pg-card")[0]["acceptedSuggestions"] == ["s1"]


def test_bad_database_url_refuses_to_start(tmp_path):
    with pytest.raises(ValueError, match="CDS_DATABASE_URL"):
        create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), database_url="mysql://nope"))


def test_issued_cards_are_found_within_their_window_and_forgotten_after(store_url):
    """Both stores: which cards were issued since a time, and dropping the notes of older ones."""
    store = open_store(store_url)
    store.record_issued([("old", "", "[]", "2026-01-01T00:00:00+00:00"), ("new", "key", "[]", "2026-06-01T00:00:00+00:00")])
    store.record_issued([("new", "other", "[]", "2026-06-02T00:00:00+00:00")])          # a second note: ignored
    assert store.issued_since(["old", "new", "never"], "2026-05-01T00:00:00+00:00") == {"new"}
    assert store.issued_card("new") == ("key", "[]")
    assert store.forget_issued_before("2026-05-01T00:00:00+00:00") == 1
    assert store.issued_since(["old", "new"], "2000-01-01T00:00:00+00:00") == {"new"}
