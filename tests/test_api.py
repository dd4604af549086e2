"""CDS Hooks 2.0 endpoints (spec checklist sections A-F and J) through the Flask app."""
from __future__ import annotations

import copy
import io
import json
import re

import pytest

from cds_service import create_app
from cds_service.config import Settings

from .conftest import AS_OF, SERVICE_URL, fixture_request, issue_cards, walk_empty

TOKEN_RE = re.compile(r"^\{\{(context\.(patientId|userId|encounterId)|userPractitionerId|userPractitionerRoleId"
                      r"|userPatientId|userRelatedPersonId)\}\}$")
FULL = "patients/rheumatoid_arthritis-positive.json"


def is_outcome(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"
    assert "Traceback" not in resp.get_data(as_text=True)
    return body


def cards_of(resp):
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [{k: v for k, v in c.items() if k != "uuid"} | {"suggestions": [
        {k: v for k, v in s.items() if k != "uuid"} for s in c.get("suggestions", [])]} for c in resp.get_json()["cards"]]


# ---- B. discovery ------------------------------------------------------------------------------
def test_discovery(client):
    resp = client.get("/cds-services", headers={"Accept": "application/json"})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    services = resp.get_json()["services"]
    assert [(s["id"], s["hook"]) for s in services] == [
        ("secondary-osteoporosis", "patient-view"), ("bone-protection-order-sign", "order-sign"),
        ("bone-protection-order-select", "order-select")]
    for s in services:
        assert s["title"] and s["description"] and walk_empty(s) == []
        assert set(s["prefetch"]) >= {"patient", "conditions", "medicationRequests", "medicationStatements",
                                      "medicationAdministrations", "medicationDispenses", "observations", "procedures"}
        for key, template in s["prefetch"].items():
            assert re.fullmatch(r"[A-Za-z0-9_-]+", key)
            assert len(template.encode()) < 8192, key
            assert not template.startswith(("/", "http"))
            for token in re.findall(r"\{\{[^}]*\}\}", template):
                assert TOKEN_RE.match(token), token


def test_observation_templates_are_code_filtered_from_the_catalog(client, catalog):
    prefetch = client.get("/cds-services").get_json()["services"][0]["prefetch"]
    obs = prefetch["observations"]
    assert "code=" in obs
    for code in ("3016-3", "62292-8", "98979-8", "39156-5", "72166-2", "74013-4", "2986-8"):
        assert f"http://loinc.org|{code}" in obs
    rule_codes = {c for r in catalog.observation_rules.values() for k in ("loinc", "pth_loinc") for c in r.get(k, [])}
    assert all(f"|{c}" in obs for c in rule_codes)
    assert "38267-1" in prefetch["boneHealthObservations"]          # DXA T-score, for card context


# ---- C. invocation -------------------------------------------------------------------------------
def test_full_prefetch_gives_a_card(client, request_for):
    resp = client.post(SERVICE_URL, json=request_for(FULL))
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    assert len(resp.get_json()["cards"]) == 1


def test_no_risk_gives_empty_cards(client, request_for):
    resp = client.post(SERVICE_URL, json=request_for("patients/no-risk-factors-negative.json"))
    assert resp.status_code == 200 and resp.get_json() == {"cards": []}


def test_repeated_hook_instance_is_fine(client, request_for):
    body = request_for(FULL)
    assert client.post(SERVICE_URL, json=body).status_code == 200
    assert client.post(SERVICE_URL, json=body).status_code == 200


def test_unknown_members_and_extensions_are_ignored(client, request_for):
    body = request_for(FULL)
    plain = cards_of(client.post(SERVICE_URL, json=body))
    extra = copy.deepcopy(body)
    extra["foo"] = 1
    extra["extension"] = {"org.example.x": "y"}
    extra["context"]["encounterId"] = "enc-1"
    extra["prefetch"]["unknownKey"] = {"resourceType": "Bundle", "type": "searchset"}
    assert cards_of(client.post(SERVICE_URL, json=extra)) == plain


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.pop("hook"), "'hook' is required"),
    (lambda b: b.update(hook="order-sign"), "answers the 'patient-view' hook"),
    (lambda b: b.pop("hookInstance"), "'hookInstance' is required"),
    (lambda b: b.update(hookInstance=""), "'hookInstance' is required"),
    (lambda b: b.pop("context"), "'context' is required"),
    (lambda b: b["context"].pop("patientId"), "'context.patientId' is required"),
    (lambda b: b["context"].update(patientId=42), "'context.patientId' is required"),
    (lambda b: b.update(prefetch=[1, 2]), "'prefetch' must be an object"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 60,
                                           "scope": "patient/*.read", "subject": "cds"}), "requires 'fhirServer'"),
    (lambda b: b.update(fhirServer="https://ehr.example.org/fhir", fhirAuthorization={"access_token": "t"}),
     "'fhirAuthorization.token_type' is required"),
    (lambda b: b.update(fhirServer="https://ehr.example.org/fhir", fhirAuthorization={
        "access_token": "t", "token_type": "Bearer", "expires_in": 60, "scope": "s", "subject": "c", "patient": "other"}),
     "does not match"),
    (lambda b: b.update(fhirServer="ftp://ehr.example.org"), "http\\(s\\) URL"),
    (lambda b: b.update(extension="x"), "'extension' must be an object"),
])
def test_bad_requests_get_400_with_an_operation_outcome(client, request_for, mutate, message):
    body = request_for(FULL)
    mutate(body)
    outcome = is_outcome(client.post(SERVICE_URL, json=body), 400)
    assert re.search(message, outcome["issue"][0]["diagnostics"])


def test_malformed_json_and_wrong_content_type(client):
    is_outcome(client.post(SERVICE_URL, data=b"{not json", content_type="application/json"), 400)
    is_outcome(client.post(SERVICE_URL, data=b'{"hook": "patient-view"}', content_type="text/plain"), 400)
    is_outcome(client.post(SERVICE_URL, data=b"", content_type="application/json"), 400)
    is_outcome(client.post(SERVICE_URL, data=b"[1,2]", content_type="application/json"), 400)


def test_unknown_service_404_and_get_on_service_405(client, request_for):
    is_outcome(client.post("/cds-services/does-not-exist", json=request_for(FULL)), 404)
    is_outcome(client.post("/cds-services/does-not-exist/feedback", json={"feedback": []}), 404)
    is_outcome(client.get("/nothing-here"), 404)
    resp = client.get(SERVICE_URL)
    is_outcome(resp, 405)
    assert "POST" in resp.headers["Allow"]


def test_oversize_body_gets_413(tmp_path, request_for):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), max_body_bytes=512))
    resp = app.test_client().post(SERVICE_URL, json=request_for(FULL))
    is_outcome(resp, 413)


# ---- D. prefetch and 412 -------------------------------------------------------------------------
def test_null_prefetch_value_means_no_data(client, request_for):
    body = request_for(FULL)
    for key in ("medicationRequests", "medicationStatements", "medicationAdministrations", "medicationDispenses",
                "observations", "boneHealthObservations", "procedures"):
        body["prefetch"][key] = None
    assert len(client.post(SERVICE_URL, json=body).get_json()["cards"]) == 1


def test_empty_searchset_means_no_data(client, request_for):
    body = request_for(FULL)
    body["prefetch"]["conditions"] = {"resourceType": "Bundle", "type": "searchset"}
    assert client.post(SERVICE_URL, json=body).get_json() == {"cards": []}


def test_missing_prefetch_without_fhir_server_is_412(client, request_for):
    body = request_for(FULL)
    del body["prefetch"]
    outcome = is_outcome(client.post(SERVICE_URL, json=body), 412)
    assert "no fhirServer" in outcome["issue"][0]["diagnostics"]
    body = request_for(FULL)
    del body["prefetch"]["conditions"]
    is_outcome(client.post(SERVICE_URL, json=body), 412)


def test_operation_outcome_in_prefetch_is_a_failed_key(client, request_for):
    body = request_for(FULL)
    body["prefetch"]["conditions"] = {"resourceType": "OperationOutcome",
                                      "issue": [{"severity": "error", "code": "timeout"}]}
    is_outcome(client.post(SERVICE_URL, json=body), 412)
    body = request_for(FULL)
    body["prefetch"]["observations"]["entry"].append({"resource": {
        "resourceType": "OperationOutcome", "issue": [{"severity": "fatal", "code": "exception"}]},
        "search": {"mode": "outcome"}})
    is_outcome(client.post(SERVICE_URL, json=body), 412)


def test_missing_patient_resource_is_412(client, request_for):
    body = request_for(FULL)
    body["prefetch"]["patient"] = None
    is_outcome(client.post(SERVICE_URL, json=body), 412)


# ---- E. responses never carry nulls or empties -------------------------------------------------------
def test_response_has_no_null_or_empty_members(client, request_for):
    body = client.post(SERVICE_URL, json=request_for("patients/already-treated-glucocorticoids-positive.json")).get_json()
    assert walk_empty(body["cards"]) == []


# ---- F. feedback ---------------------------------------------------------------------------------
FEEDBACK = SERVICE_URL + "/feedback"
ACCEPTED = {"card": "b6a1d2e4-5f3c-4e7a-8d90-1c2b3a4d5e6f", "outcome": "accepted",
            "acceptedSuggestions": [{"id": "0d3e5c7a-9b1f-4a2e-8c4d-6f7a8b9c0d1e"}],
            "outcomeTimestamp": "2026-05-02T14:03:11Z"}
OVERRIDDEN = {"card": "9a8b7c6d-5e4f-4a3b-9c2d-1e0f2a3b4c5d", "outcome": "overridden",
              "overrideReason": {"reason": {"system": "https://cds.example.org/CodeSystem/override",
                                            "code": "already-evaluated"}, "userComment": "DXA done elsewhere"},
              "outcomeTimestamp": "2026-05-02T14:05:40Z"}


@pytest.fixture(autouse=True)
def _cards_issued(app):
    """The cards the feedback examples name were issued by this service (feedback is taken for no other)."""
    issue_cards(app, ACCEPTED["card"], OVERRIDDEN["card"], "c" * 8)


def test_feedback_for_a_card_this_service_never_issued_is_refused_and_not_stored(app, client, json_log):
    resp = client.post(FEEDBACK, json={"feedback": [{**ACCEPTED, "card": "not-a-real-card"}]})
    is_outcome(resp, 404)
    assert "nothing was stored" in resp.get_json()["issue"][0]["diagnostics"]
    assert app.extensions["cds"]["feedback"].count() == 0
    assert '"event":"feedback_unknown_card"' in json_log.getvalue()
    mixed = client.post(FEEDBACK, json={"feedback": [ACCEPTED, {**OVERRIDDEN, "card": "forged"}]})
    assert mixed.status_code == 200 and mixed.get_json() == {"stored": 1, "received": 2, "unknown": 1}
    assert app.extensions["cds"]["feedback"].entries_for_card("forged") == []


def test_feedback_is_taken_for_a_card_an_invocation_issued_and_not_after_the_window(app, client):
    card = client.post(SERVICE_URL, json=fixture_request("patients/rheumatoid_arthritis-positive.json")).get_json()["cards"][0]
    entry = {**OVERRIDDEN, "card": card["uuid"]}
    assert client.post(FEEDBACK, json={"feedback": [entry]}).get_json() == {"stored": 1, "received": 1}
    issue_cards(app, "old-card", days_ago=31)                       # CDS_FEEDBACK_DAYS: 30
    is_outcome(client.post(FEEDBACK, json={"feedback": [{**OVERRIDDEN, "card": "old-card"}]}), 404)


@pytest.mark.parametrize("snooze", ["off", "secret-1-a-long-enough-hmac-key-abc"])
def test_notes_of_cards_older_than_the_feedback_window_are_dropped(tmp_path, monkeypatch, snooze):
    """With snooze off or on. Pruning and the snooze notes are written behind the response; with snooze off a card
    writes nothing at all (its uuid proves its issue)."""
    from cds_service import create_app
    from cds_service.web import api
    from cds_service.config import Settings
    monkeypatch.setattr(api, "PRUNE_EVERY", 1)
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), log_level="WARNING",
                              **({"snooze": "off"} if snooze == "off" else {"snooze_secrets": snooze})))
    issue_cards(app, "ancient", days_ago=40)
    issue_cards(app, "recent", days_ago=5)
    body = fixture_request("patients/rheumatoid_arthritis-positive.json")
    body["fhirServer"] = "https://ehr.example.org/fhir"
    card = app.test_client().post(SERVICE_URL, json=body).get_json()["cards"][0]
    assert app.extensions["cds"]["behind"].drain()
    store = app.extensions["cds"]["feedback"]
    assert store.issued_since(["ancient", "recent", card["uuid"]], "2000-01-01T00:00:00+00:00") == \
        ({"recent"} if snooze == "off" else {card["uuid"], "recent"})


def test_feedback_is_persisted_by_card_uuid(app, client):
    resp = client.post(FEEDBACK, json={"feedback": [ACCEPTED, OVERRIDDEN, {**ACCEPTED, "card": "c" * 8}]})
    assert resp.status_code == 200 and resp.get_json() == {"stored": 3, "received": 3}
    store = app.extensions["cds"]["feedback"]
    saved = store.entries_for_card(OVERRIDDEN["card"])
    assert saved == [{"outcome": "overridden", "outcomeTimestamp": "2026-05-02T14:05:40Z", "acceptedSuggestions": [],
                      "overrideSystem": "https://cds.example.org/CodeSystem/override",
                      "overrideCode": "already-evaluated", "userComment": "DXA done elsewhere"}]
    assert store.entries_for_card(ACCEPTED["card"])[0]["acceptedSuggestions"] == [ACCEPTED["acceptedSuggestions"][0]["id"]]


def test_duplicate_feedback_is_idempotent(app, client):
    for _ in range(2):
        assert client.post(FEEDBACK, json={"feedback": [ACCEPTED]}).status_code == 200
    assert app.extensions["cds"]["feedback"].count() == 1


@pytest.mark.parametrize("entry", [
    {**OVERRIDDEN, "overrideReason": {"reason": {"system": "s", "code": "c"}}},     # sandbox: no display
    {**OVERRIDDEN, "overrideReason": {"userComment": "not now"}},
    {k: v for k, v in OVERRIDDEN.items() if k != "overrideReason"},
    {**OVERRIDDEN, "overrideReason": {"system": "s", "code": "c", "display": "d"}},  # older: bare Coding
    {**ACCEPTED, "outcomeTimestamp": "2026-05-02T16:03:11.250+02:00"},                 # RFC 3339 with an offset
])
def test_feedback_shapes_clients_send(client, entry):
    assert client.post(FEEDBACK, json={"feedback": [entry]}).status_code == 200


@pytest.mark.parametrize("entry", [
    {**ACCEPTED, "outcome": "rejected"},
    {k: v for k, v in ACCEPTED.items() if k != "acceptedSuggestions"},
    {k: v for k, v in ACCEPTED.items() if k != "outcomeTimestamp"},
    {**ACCEPTED, "outcomeTimestamp": "yesterday"},
    {**ACCEPTED, "outcomeTimestamp": "2026-05-02T14:03:11"},            # RFC 3339 needs a time zone
    {**ACCEPTED, "outcomeTimestamp": "2026-05-02"},
    {**ACCEPTED, "outcomeTimestamp": "20260502T140311Z"},               # ISO 8601 basic form is not RFC 3339
    {**ACCEPTED, "acceptedSuggestions": ["0d3e5c7a-9b1f-4a2e-8c4d-6f7a8b9c0d1e"]},   # ids must be objects
    {**ACCEPTED, "acceptedSuggestions": [{"id": 7}]},
    {**OVERRIDDEN, "overrideReason": {"reason": {"system": 12, "code": "c"}}},          # a Coding of strings
    {**OVERRIDDEN, "overrideReason": {}},
    {k: v for k, v in ACCEPTED.items() if k != "card"},
    "not an object",
])
def test_invalid_feedback_is_400_and_nothing_is_stored(app, client, entry):
    is_outcome(client.post(FEEDBACK, json={"feedback": [ACCEPTED, entry]}), 400)
    assert app.extensions["cds"]["feedback"].count() == 0


def test_feedback_body_must_be_a_feedback_array(client):
    for body in ({}, {"feedback": []}, {"feedback": "x"}, [1]):
        is_outcome(client.post(FEEDBACK, json=body), 400)


# ---- J. CORS -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, method", [("/cds-services", "GET"), (SERVICE_URL, "POST"), (FEEDBACK, "POST")])
def test_cors_preflight_needs_no_credentials(client, path, method):
    resp = client.options(path, headers={"Origin": "https://sandbox.cds-hooks.org",
                                         "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": "authorization,content-type"})
    assert resp.status_code in (200, 204)
    assert resp.headers["Access-Control-Allow-Origin"] in ("*", "https://sandbox.cds-hooks.org")
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert {"GET", "POST"} <= {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}


def test_cors_header_on_errors_too(client):
    resp = client.post(SERVICE_URL, data=b"nope", content_type="application/json",
                       headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert resp.status_code == 400 and resp.headers["Access-Control-Allow-Origin"]


def test_cors_allowlist_reflects_only_listed_origins(tmp_path):
    app = create_app(Settings(auth="off", data_dir=str(tmp_path), cors_origins="https://ehr.example.org"))
    c = app.test_client()
    assert c.get("/cds-services", headers={"Origin": "https://ehr.example.org"}).headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    assert "Access-Control-Allow-Origin" not in c.get("/cds-services", headers={"Origin": "https://evil.example"}).headers


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json()["status"] == "ok"


def test_logs_carry_no_patient_data(client, request_for, json_log):
    body = request_for(FULL)
    client.post(SERVICE_URL, json=body)
    client.post(FEEDBACK, json={"feedback": [OVERRIDDEN]})
    client.post(SERVICE_URL, data=b"{broken " + body["context"]["patientId"].encode(), content_type="application/json")
    buf = json_log
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    requests_logged = [line for line in lines if line.get("event") == "request"]
    assert len(requests_logged) == 3 and {r["status"] for r in requests_logged} == {200, 400}
    assert all("request_id" in r and "duration_ms" in r and r["service"] in ("service", "feedback") for r in requests_logged)
    served = next(r for r in requests_logged if r["status"] == 200 and r["service"] == "service")
    assert {"prefetch_ms", "engine_ms", "render_ms", "resources", "findings", "cards"} <= set(served)
    text = buf.getvalue()
    for secret in (body["context"]["patientId"], "Rheumatoid", "M06.9", "69896004", "DXA done elsewhere", OVERRIDDEN["card"]):
        assert secret not in text


def test_metrics_endpoint(client, request_for):
    client.post(SERVICE_URL, json=request_for(FULL))
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = resp.get_data(as_text=True)
    assert 'cds_requests_total{service="service",service_id="secondary-osteoporosis",status="200"}' in text
    assert re.search(r'cds_cards_total\{indicator="(warning|info)",service_id="secondary-osteoporosis"\}', text)
    assert "cds_fhir_fallback_calls_total" in text


# ---- input that must never get through ------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"patientId": NaN}}',
    b'{"hook": "patient-view", "context": {"n": -Infinity}}',
    b'{"hook": "patient-view", "context": {"n": 1e999}}',
    b'{"hook": "patient-\\ud800view", "context": {}}',            # a lone UTF-16 surrogate
    b'{"hook": "patient-view", "context": {"x": "\\udfff"}}',
])
def test_non_finite_numbers_and_lone_surrogates_are_400(client, raw):
    resp = client.post(SERVICE_URL, data=raw, content_type="application/json")
    body = is_outcome(resp, 400)
    assert "line 1" in body["issue"][0]["diagnostics"] and "patient-" not in body["issue"][0]["diagnostics"]


def test_a_chunked_body_over_the_limit_is_413(tmp_path):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), max_body_bytes=2048, log_level="WARNING"))
    client = app.test_client()
    big = json.dumps({"hook": "patient-view", "context": {"pad": "x" * 5000}}).encode()
    # no Content-Length, as a chunked upload arrives through the server
    resp = client.post(SERVICE_URL, input_stream=io.BytesIO(big), content_type="application/json",
                       environ_base={"wsgi.input_terminated": True})
    is_outcome(resp, 413)


@pytest.mark.parametrize("given, kept", [
    ("3f2b1c4e-9d8a-4b7c-8e6f-5a4b3c2d1e0f", True),
    ("4bf92f3577b34da6a3ce929d0e0e4736", True),
    ("MRN-004417", False),                     # could carry a patient identifier
    ("12345678901234567890", False),           # a bare number
    ("<script>alert(1)</script>", False),
])
def test_x_request_id_is_kept_only_in_a_safe_shape(client, given, kept):
    resp = client.get("/cds-services", headers={"X-Request-Id": given})
    assert (resp.headers["X-Request-Id"] == given) is kept
    assert re.fullmatch(r"[0-9a-fA-F-]{16,64}", resp.headers["X-Request-Id"])


# ---- sandbox interop: URLs typed with a slash, private-network preflight --------------------------
def test_discovery_and_service_urls_typed_with_extra_slashes(client):
    """A discovery URL typed as `.../cds-services/` makes clients call `.../cds-services//secondary-osteoporosis`."""
    assert client.get("/cds-services/").status_code == 200
    resp = client.post("/cds-services//secondary-osteoporosis", json=fixture_request("patients/rheumatoid_arthritis-positive.json"))
    assert resp.status_code == 200 and resp.get_json()["cards"]
    assert client.post("/cds-services//secondary-osteoporosis/feedback/", json={"feedback": []}).status_code == 400


def test_private_network_preflight_is_answered_for_allowed_origins(client):
    resp = client.options(SERVICE_URL, headers={"Origin": "https://sandbox.cds-hooks.org",
                                                "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Private-Network": "true"})
    assert resp.status_code == 204 and resp.headers["Access-Control-Allow-Private-Network"] == "true"
    plain = client.options(SERVICE_URL, headers={"Origin": "https://sandbox.cds-hooks.org",
                                                 "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Private-Network" not in plain.headers
