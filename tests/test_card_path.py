"""Issue 21, item 1: the card path writes nothing to the store. A card's uuid proves its issue (a UUIDv8 with the
issue time and a MAC, card_ids.py), so feedback needs no note of it; the snooze notes and the pruning of old notes
are written behind the response (behind.py); a store that does not answer a snooze read is not asked again on the
card path for a while. With the store frozen, cards go out at healthy speed."""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from cds_service import create_app
from cds_service.storage.card_ids import CardIds
from cds_service.config import Settings

from .conftest import AS_OF, SERVICE_URL, fixture_request

SECRET = "card-path-test-secret-0123456789abcdef"
WRITES = ("record_issued", "save", "set_snooze", "forget_issued_before")


def make_app(tmp_path, snooze: str = "on"):
    extra = {"snooze_secrets": SECRET} if snooze == "on" else {"snooze": "off"}
    return create_app(Settings(auth="off", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), log_level="WARNING",
                               **extra))


def positive(fhir_server="https://ehr.example.org/fhir"):
    body = fixture_request("patients/rheumatoid_arthritis-positive.json")
    body["fhirServer"] = fhir_server
    return body


def feedback(card_uuid: str) -> dict:
    return {"feedback": [{"card": card_uuid, "outcome": "overridden",
                          "outcomeTimestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "overrideReason": {"userComment": "seen"}}]}


@pytest.mark.parametrize("snooze", ["on", "off"])
def test_serving_a_card_writes_nothing_on_the_request_thread(tmp_path, snooze, monkeypatch):
    app = make_app(tmp_path, snooze)
    guarded = app.extensions["cds"]["feedback"]
    calls = []                                          # (store method, the thread that asked for it)
    real_call = guarded.call

    def watched(method, *args, **kw):
        calls.append((method, threading.current_thread().name))
        return real_call(method, *args, **kw)
    monkeypatch.setattr(guarded, "call", watched)
    resp = app.test_client().post(SERVICE_URL, json=positive())
    assert resp.status_code == 200 and resp.get_json()["cards"]
    assert app.extensions["cds"]["behind"].drain()
    request_thread = threading.current_thread().name     # the test client runs the request on this thread
    assert [m for m, t in calls if t == request_thread and m in WRITES] == []
    assert [m for m, t in calls if t == "store-behind"] == (["record_issued"] if snooze == "on" else [])


def test_a_note_waiting_behind_the_response_holds_no_patient_record(tmp_path, monkeypatch):
    """The snooze notes of a response wait in a queue of up to 1,000 jobs while the store is slow. A job that held
    the assessment kept each waiting patient's whole record (every resource of the chart) in memory; it holds the
    notes' text only, and its cards' notes are written in one transaction once the store answers."""
    import gc
    import weakref
    from cds_service.fhir.record.builder import RecordBuilder

    app = make_app(tmp_path, "on")
    records = []
    real_build = RecordBuilder.build

    def build(self, *args, **kw):
        record = real_build(self, *args, **kw)
        records.append(weakref.ref(record))
        return record
    monkeypatch.setattr(RecordBuilder, "build", build)
    behind, gate = app.extensions["cds"]["behind"], threading.Event()
    behind.submit(lambda: gate.wait(20), "a slow store")                     # the notes queue behind this
    try:
        cards = app.test_client().post(SERVICE_URL, json=positive()).get_json()["cards"]
        assert cards and len(records) == 1
        gc.collect()
        assert records[0]() is None, "a queued note keeps the patient's record alive"
    finally:
        gate.set()
    assert behind.drain()
    store = app.extensions["cds"]["feedback"].store
    assert store.issued_since([c["uuid"] for c in cards], "2000-01-01T00:00:00+00:00") == {c["uuid"] for c in cards}


def test_feedback_on_a_card_needs_no_note_of_it(tmp_path):
    app = make_app(tmp_path, "off")
    client = app.test_client()
    card = client.post(SERVICE_URL, json=positive()).get_json()["cards"][0]
    assert uuid.UUID(card["uuid"]).version == 8
    store = app.extensions["cds"]["feedback"].store
    assert store.issued_since([card["uuid"]], "2000-01-01T00:00:00+00:00") == set()      # never noted
    resp = client.post(SERVICE_URL + "/feedback", json=feedback(card["uuid"]))
    assert resp.status_code == 200 and resp.get_json()["stored"] == 1


def test_a_forged_expired_or_foreign_card_uuid_is_refused(tmp_path):
    app = make_app(tmp_path, "off")
    client = app.test_client()
    ids = app.extensions["cds"]["card_ids"]
    forged = str(uuid.UUID(int=uuid.UUID(ids.new()).int ^ 1))                     # one bit of the MAC flipped
    expired = ids.new((datetime.now(timezone.utc) - timedelta(days=31)).timestamp())  # CDS_FEEDBACK_DAYS: 30
    foreign = CardIds(["another-service-secret-0123456789abcdef"]).new()
    for card_uuid in (forged, expired, foreign, str(uuid.uuid4())):
        assert client.post(SERVICE_URL + "/feedback", json=feedback(card_uuid)).status_code == 404


def test_card_ids_verify_under_an_older_secret_after_rotation():
    old = CardIds(["old-secret-0123456789abcdef0123456789"])
    card = old.new(1_800_000_000)
    rotated = CardIds(["new-secret-0123456789abcdef0123456789", "old-secret-0123456789abcdef0123456789"])
    assert rotated.issued_at(card) == datetime.fromtimestamp(1_800_000_000, timezone.utc)
    assert CardIds(["new-secret-0123456789abcdef0123456789"]).issued_at(card) is None


def test_a_frozen_store_costs_at_most_one_card_its_deadline(tmp_path):
    """Every store call blocks (a frozen PostgreSQL, a locked SQLite file): the first card waits for the snooze
    read's deadline (0.5 s), the next ones go out at once; the notes queued behind them are dropped, not waited for."""
    app = make_app(tmp_path, "on")
    client = app.test_client()
    client.post(SERVICE_URL, json=positive("https://warm.example.org/fhir"))                   # warm caches
    thaw = threading.Event()
    guarded = app.extensions["cds"]["feedback"]
    real = guarded.store

    class Frozen:
        def __getattr__(self, name):
            attr = getattr(real, name)
            return (lambda *a, **k: (thaw.wait(20), attr(*a, **k))[1]) if callable(attr) else attr
    guarded.store = Frozen()
    try:
        seconds = []
        for n in range(6):
            start = time.monotonic()
            resp = client.post(SERVICE_URL, json=positive(f"https://ehr{n}.example.org/fhir"))
            seconds.append(time.monotonic() - start)
            assert resp.status_code == 200 and resp.get_json()["cards"]
        assert seconds[0] < 1.5 and max(seconds[1:]) < 0.3, seconds
    finally:
        thaw.set()


def test_a_deleted_database_file_is_not_ready_and_feedback_is_refused_not_lost(tmp_path):
    """Posts to a deleted SQLite file were acknowledged and lost at restart, and /readyz stayed 200."""
    app = make_app(tmp_path, "off")
    client = app.test_client()
    card = client.post(SERVICE_URL, json=positive()).get_json()["cards"][0]
    assert client.get("/readyz").status_code == 200
    (tmp_path / "feedback.sqlite3").unlink()
    assert client.get("/readyz").status_code == 503
    resp = client.post(SERVICE_URL + "/feedback", json=feedback(card["uuid"]))
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert "may not have been stored" in resp.get_json()["issue"][0]["diagnostics"]
    assert client.post(SERVICE_URL, json=positive("https://other.example.org/fhir")).get_json()["cards"]   # cards go on



def test_a_card_issued_to_one_client_is_not_another_clients_to_act_on():
    """Issue 21: feedback naming another EHR's card (or sent with no client) must not touch it."""
    ids = CardIds([SECRET])
    card = ids.new(client="https://ehr-a.example.org")
    assert ids.issued_at(card, "https://ehr-a.example.org") is not None
    assert ids.issued_at(card, "https://ehr-b.example.org") is None and ids.issued_at(card, "") is None


def test_snooze_keys_are_bound_to_the_client_and_the_fhir_server():
    from cds_service.storage.snooze import SnoozeBook
    book = SnoozeBook(store=None, secrets=[SECRET], days=182)
    keys = {book.patient_keys(server, "p-1", client)[0]
            for client in ("", "https://ehr-a.example.org", "https://ehr-b.example.org")
            for server in ("", "https://fhir-a.example.org", "https://fhir-b.example.org")}
    assert len(keys) == 9


def test_a_client_posting_feedback_in_bulk_is_throttled_with_429(tmp_path):
    """Feedback had no count limit (1.1 M rows accepted): past a burst of 120, a client gets 429 and Retry-After."""
    app = make_app(tmp_path, "off")
    FEEDBACK_BURST = app.extensions["cds"]["settings"].feedback_per_minute // 5            # 120 by default
    client = app.test_client()
    card = client.post(SERVICE_URL, json=positive()).get_json()["cards"][0]
    statuses = [client.post(SERVICE_URL + "/feedback", json=feedback(card["uuid"])).status_code
                for _ in range(FEEDBACK_BURST + 5)]
    assert set(statuses[:FEEDBACK_BURST]) == {200} and statuses[-1] == 429
    throttled = client.post(SERVICE_URL + "/feedback", json=feedback(card["uuid"]))
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert throttled.get_json()["resourceType"] == "OperationOutcome"
