"""Snooze: an overridden or accepted card stays away for that patient, unless something new appears."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from cds_service import create_app
from cds_service.fhir.bundles import request_from_bundle
from cds_service.config import Settings

from .conftest import AS_OF, ROOT, SERVICE_URL

sys.path.insert(0, str(ROOT))
from fixtures.generate import ICD, Patient  # noqa: E402

SERVER = "https://ehr.example.org/fhir"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


def make_client(tmp_path, database_url: str, secrets: str):
    settings = Settings(auth="off", cors_origins="*", data_dir=str(tmp_path / "data"), as_of=AS_OF.isoformat(), database_url=database_url,
                        snooze_secrets=secrets, log_level="WARNING")
    return create_app(settings).test_client()


def ra_patient(pid: str = "snooze-1") -> Patient:
    p = Patient(pid, age=64, style="searchset")
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=900)
    return p


def invoke(client, p: Patient) -> list[dict]:
    body = request_from_bundle(p.bundle())
    body["fhirServer"] = SERVER
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["cards"]


def override(client, card: dict, when: datetime | None = None) -> None:
    when = when or datetime.now(timezone.utc)
    body = {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                          "outcomeTimestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "overrideReason": {"reason": {"system": "x", "code": "already-evaluated"}}}]}
    assert client.post(SERVICE_URL + "/feedback", json=body).status_code == 200


def test_an_overridden_card_is_snoozed_until_something_new_appears(tmp_path, database_url):
    client = make_client(tmp_path, database_url, "secret-2026-a-long-enough-hmac-key")
    p = ra_patient()
    card = invoke(client, p)[0]
    override(client, card)
    assert invoke(client, p) == []                       # the same chart: quiet for the snooze period
    assert invoke(client, ra_patient("someone-else"))      # only that patient
    p.condition(ICD, "C90.00", "Multiple myeloma not having achieved remission", onset=30)
    assert invoke(client, p)                             # a new cause brings the card back


def test_a_snooze_ends_after_its_period(tmp_path, database_url):
    client = make_client(tmp_path, database_url, "secret-2026-a-long-enough-hmac-key")
    p = ra_patient()
    override(client, invoke(client, p)[0], datetime.now(timezone.utc) - timedelta(days=200))
    assert invoke(client, p)                             # 182 days by default


def test_secrets_rotate_without_losing_snoozes_and_no_raw_ids_are_stored(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    client = make_client(tmp_path, url, "old-secret-a-long-enough-hmac-key-1")
    p = ra_patient("patient-raw-id-123")
    override(client, invoke(client, p)[0])
    rotated = make_client(tmp_path, url, "new-secret-a-long-enough-hmac-key-2,old-secret-a-long-enough-hmac-key-1")
    assert invoke(rotated, p) == []
    dump = "\n".join(sqlite3.connect(tmp_path / "feedback.sqlite3").iterdump())
    assert "patient-raw-id-123" not in dump and SERVER not in dump
    dropped = make_client(tmp_path, url, "new-secret-a-long-enough-hmac-key-2")    # the old secret retired: its snoozes lapse
    assert invoke(dropped, p)


def test_explain_says_when_a_card_is_snoozed(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    client = make_client(tmp_path, url, "secret-2026-a-long-enough-hmac-key")
    p = ra_patient()
    override(client, invoke(client, p)[0])
    body = request_from_bundle(p.bundle())
    body["fhirServer"] = SERVER
    (tmp_path / "req.json").write_text(json.dumps(body))
    env = {"CDS_DATABASE_URL": url, "CDS_SNOOZE_SECRETS": "secret-2026-a-long-enough-hmac-key", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "cds_service.cli", "evaluate", "--explain", "--as-of", AS_OF.isoformat(),
                          str(tmp_path / "req.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    line = json.loads(out.stdout)
    assert line["cards"] == [] and line["context"]["snoozed"] is True
    assert [f["cause"] for f in line["findings"]] == ["rheumatoid_arthritis"]


def test_a_broken_snooze_store_never_costs_the_card(tmp_path):
    client = make_client(tmp_path, f"sqlite:///{tmp_path / 'feedback.sqlite3'}", "secret-2026-a-long-enough-hmac-key")
    book = client.application.extensions["cds"]["snooze"]

    class Down:
        def __getattr__(self, name):
            raise OSError("database is down")
    book.store = Down()
    assert invoke(client, ra_patient())


def test_snooze_is_on_by_default_with_a_secret_kept_in_the_store(tmp_path, database_url):
    """Issue 19: no CDS_SNOOZE_SECRETS configured: a random secret is made once and kept with the store, so every
    worker and replica on that store keys patients alike (a second app on the same store honours the snooze)."""
    first = make_client(tmp_path, database_url, "")
    p = ra_patient("default-on")
    override(first, invoke(first, p)[0])
    assert invoke(first, p) == []
    second = make_client(tmp_path / "replica", database_url, "")
    assert invoke(second, p) == []                       # the same generated secret
    store = first.application.extensions["cds"]["feedback"].store
    assert len(store.secret("snooze-hmac")) == 64 and store.secret("snooze-hmac") == store.secret("snooze-hmac")


def test_snooze_can_be_switched_off(tmp_path):
    settings = Settings(auth="off", cors_origins="*", data_dir=str(tmp_path / "data"), as_of=AS_OF.isoformat(), snooze="off", log_level="WARNING")
    client = create_app(settings).test_client()
    p = ra_patient("off")
    card = invoke(client, p)[0]
    assert client.application.extensions["cds"]["snooze"] is None
    override(client, card)
    assert invoke(client, p)                             # no snooze: the card comes back


def _snooze_until(tmp_path) -> list[str]:
    return [r[0] for r in sqlite3.connect(tmp_path / "feedback.sqlite3").execute("SELECT until FROM snoozes")]


def test_a_timestamp_in_the_future_snoozes_from_now_not_from_then(tmp_path):
    """Issue 21: a caller's outcomeTimestamp in 2199 (or 9999) snoozed until then; the clock is clamped to now."""
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    client = make_client(tmp_path, url, "secret-2026-a-long-enough-hmac-key")
    override(client, invoke(client, ra_patient())[0], datetime(9999, 12, 31, tzinfo=timezone.utc))
    (until,) = _snooze_until(tmp_path)
    latest = datetime.now(timezone.utc) + timedelta(days=182, minutes=6)
    assert datetime.fromisoformat(until) <= latest


def test_older_feedback_never_shortens_a_live_snooze(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    client = make_client(tmp_path, url, "secret-2026-a-long-enough-hmac-key")
    p = ra_patient()
    card = invoke(client, p)[0]
    override(client, card)
    override(client, card, datetime.now(timezone.utc) - timedelta(days=200))     # a late copy of old feedback
    assert invoke(client, p) == []
    (until,) = _snooze_until(tmp_path)
    assert datetime.fromisoformat(until) > datetime.now(timezone.utc) + timedelta(days=180)


def test_a_short_snooze_secret_is_refused_at_start_up():
    from cds_service.config import Settings
    with pytest.raises(ValueError, match="at least 32 characters"):
        Settings.from_env({"CDS_SNOOZE_SECRETS": "x"})


@pytest.mark.parametrize("body, says", [
    ({"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-06-30T10:00:00Z",
                    "overrideReason": {"userComment": "x"}}] * 51}, "At most 50 feedback entries"),
    ({"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-06-30T10:00:00Z",
                    "overrideReason": {"userComment": "x" * 9_000_000}}]}, "userComment: at most 4000 characters"),
])
def test_feedback_has_a_size_limit_with_a_clear_413(tmp_path, body, says):
    client = make_client(tmp_path, f"sqlite:///{tmp_path / 'feedback.sqlite3'}", "secret-2026-a-long-enough-hmac-key")
    resp = client.post(SERVICE_URL + "/feedback", json=body)
    assert resp.status_code == 413 and says in resp.get_json()["issue"][0]["diagnostics"]


def test_fracture_record_ids_are_never_stored_in_clear(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    client = make_client(tmp_path, url, "secret-2026-a-long-enough-hmac-key")
    p = ra_patient("fracture-ids")
    fracture = p.condition(ICD, "S72.001A", "Fracture of unspecified part of neck of right femur, initial encounter",
                           onset=100)
    override(client, invoke(client, p)[0])
    client.application.extensions["cds"]["behind"].drain()
    dump = "\n".join(sqlite3.connect(tmp_path / "feedback.sqlite3").iterdump())
    assert "snoozes" in dump and fracture["id"] not in dump
