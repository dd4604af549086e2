"""Bone protection at prescribing: the order-sign and order-select services, through the production
server (gunicorn, `cds-service serve`) on loopback, with the requests in fixtures/orders/ (written by
fixtures/generate_orders.py the way EHRs send draft orders)."""
from __future__ import annotations

import copy
import json
import re
import signal
from datetime import date

import pytest
import requests

from cds_service.knowledge.catalog import RXNORM, load_catalog
from cds_service.clinical.orders import regimen_text
from cds_service.fhir.record import MedicationExposure

from .conftest import ROOT, LiveServer, walk_empty

SIGN = "/cds-services/bone-protection-order-sign"
SELECT = "/cds-services/bone-protection-order-select"


def order_fixture(name: str) -> dict:
    return json.loads((ROOT / "fixtures" / "orders" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("orders")).start()
    yield s
    s.kill(signal.SIGTERM)


def call(server, name: str, body: dict | None = None) -> requests.Response:
    body = body or order_fixture(name)
    url = SELECT if body["hook"] == "order-select" else SIGN
    return requests.post(server.base + url, json=body, timeout=10)


def card_of(server, name: str) -> dict | None:
    r = call(server, name)
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    assert len(cards) <= 1                         # one card per invocation
    return cards[0] if cards else None


def labels(card: dict) -> list[str]:
    return [s["label"] for s in card.get("suggestions", [])]


def medication_drafts(card: dict) -> list[dict]:
    return [(s, a["resource"]) for s in card["suggestions"] for a in s["actions"]
            if a["resource"]["resourceType"] == "MedicationRequest"]


# ---- discovery and context validation ------------------------------------------------------------
def test_discovery_lists_the_prescribing_services(server):
    services = {s["id"]: s for s in requests.get(server.base + "/cds-services", timeout=5).json()["services"]}
    assert services["bone-protection-order-sign"]["hook"] == "order-sign"
    assert services["bone-protection-order-select"]["hook"] == "order-select"
    for sid in ("bone-protection-order-sign", "bone-protection-order-select"):
        s = services[sid]
        assert s["title"] and s["description"] and walk_empty(s) == []
        assert "code=http://loinc.org|" in s["prefetch"]["observations"]      # code-filtered from the catalog
        assert s["prefetch"] == services["secondary-osteoporosis"]["prefetch"]


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b["context"].pop("draftOrders"), "draftOrders"),
    (lambda b: b["context"].update(draftOrders={"resourceType": "MedicationRequest"}), "draftOrders"),
    (lambda b: b["context"]["draftOrders"].update(entry=[{"fullUrl": "x"}]), "entry"),
    (lambda b: b["context"].pop("userId"), "userId"),
    (lambda b: b["context"].pop("patientId"), "patientId"),
    (lambda b: b.update(hook="patient-view"), "order-sign"),
])
def test_order_sign_context_is_validated(server, mutate, message):
    body = order_fixture("prednisone-10mg-90-days")
    mutate(body)
    r = requests.post(server.base + SIGN, json=body, timeout=5)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert message in r.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("selections, message", [
    (None, "selections"), ([], "selections"), ([7], "selections"),
    (["MedicationRequest/not-in-the-bundle"], "not in draftOrders"),
])
def test_order_select_needs_selections_that_name_draft_orders(server, selections, message):
    body = order_fixture("order-select-two-selections")
    if selections is None:
        del body["context"]["selections"]
    else:
        body["context"]["selections"] = selections
    r = requests.post(server.base + SELECT, json=body, timeout=5)
    assert r.status_code == 400 and message in r.json()["issue"][0]["diagnostics"]


def test_a_draft_order_sent_to_patient_view_is_not_read_as_a_prescription(server):
    """Drafts in a patient-view prefetch (status draft) are not exposure: only the order hooks read them."""
    body = order_fixture("prednisone-10mg-90-days")
    body["hook"] = "patient-view"
    drafts = body["context"].pop("draftOrders")["entry"]
    body["prefetch"]["medicationRequests"].setdefault("entry", []).extend(drafts)
    r = requests.post(server.base + "/cds-services/secondary-osteoporosis", json=body, timeout=5)
    assert r.status_code == 200
    assert all("glucocorticoid" not in c["summary"] for c in r.json()["cards"])


# ---- the scenarios ---------------------------------------------------------------------------------
def test_prednisone_10mg_for_90_days_fires_with_the_regimen_risk_and_one_click_suggestions(server):
    card = card_of(server, "prednisone-10mg-90-days")
    assert card["summary"] == "Prednisone 10 mg daily for 3 months: protect bone (ACR 2022)"
    assert card["indicator"] == "warning"
    detail = card["detail"]
    assert "With this order: 90 days at \\>= 2.5 mg/day prednisone-equivalent" in detail
    assert "ACR 2022 fracture risk: at least moderate" in detail and "T-score -1.8" in detail
    assert "No DXA in the last 730 days" in detail
    assert labels(card)[:2] == ["Order DXA with vertebral fracture assessment (glucocorticoid therapy)",
                                "Calcium and vitamin D supplement"]
    dxa = card["suggestions"][0]["actions"]
    assert {a["resource"]["code"]["coding"][0]["code"] for a in dxa} == {"77085"}
    # moderate risk and every guard holds (eGFR 74, calcium 9.4, 25-OH D 34): alendronate to consider
    (cad_s, cad), (aln_s, aln) = medication_drafts(card)
    assert cad_s["isRecommended"] is True and "coding" not in cad["medicationCodeableConcept"]   # no verified code
    assert aln_s["isRecommended"] is False
    assert aln["status"] == "draft" and aln["intent"] == "proposal"
    assert aln["medicationCodeableConcept"]["coding"] == [{"system": RXNORM, "code": "46041", "display": "Alendronate"}]
    assert aln["dosageInstruction"][0]["timing"]["repeat"] == {"frequency": 1, "period": 1, "periodUnit": "wk"}
    assert aln["subject"] == {"reference": "Patient/" + order_fixture("prednisone-10mg-90-days")["context"]["patientId"]}
    reasons = {r["code"] for r in card["overrideReasons"]}
    assert {"short-course", "bone-protection-elsewhere"} <= reasons
    assert any("doi.org" in link["url"] for link in card["links"])
    assert walk_empty(card) == []


def test_a_course_that_starts_next_week_counts_from_its_start(server):
    body = order_fixture("prednisone-10mg-90-days")
    d = body["context"]["draftOrders"]["entry"][0]["resource"]
    d["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"] = {"start": "2026-07-07"}
    card = call(server, "", body).json()["cards"][0]
    assert card["summary"] == "Prednisone 10 mg daily for 3 months: protect bone (ACR 2022)"


def test_a_five_day_burst_gives_no_card(server):
    assert card_of(server, "prednisone-40mg-5-days") is None


def test_a_short_course_on_top_of_ten_weeks_on_record_fires(server):
    card = card_of(server, "prednisone-5mg-30-days-after-10-weeks")
    assert card["summary"].startswith("Prednisone 5 mg daily for 30 days")
    assert "On record: predniSONE 5 MG Oral Tablet" in card["detail"]
    assert re.search(r"With this order: (9\d|10\d) days", card["detail"])
    assert "ACR 2022 fracture risk: not yet known" in card["detail"]        # no DXA: cannot be decided
    assert "cannot be decided without a DXA" in card["detail"]
    assert not any(s["isRecommended"] is False for s in card["suggestions"])    # no bisphosphonate without a stratum


@pytest.mark.parametrize("name", ["inhaled-fluticasone", "hydrocortisone-replacement"])
def test_inhaled_and_replacement_steroids_give_no_card(server, name):
    assert card_of(server, name) is None


def test_methylprednisolone_16mg_for_4_months_fires_below_the_very_high_tier(server):
    card = card_of(server, "methylprednisolone-16mg-4-months")
    assert card["summary"] == "Methylprednisolone 16 mg daily for 4 months: protect bone (ACR 2022)"
    assert "up to 20 mg/day" in card["detail"]                   # 16 mg x 1.25 prednisone-equivalent
    assert "very high" not in card["detail"] and "raise FRAX MOF x1.15" in card["detail"]


@pytest.mark.parametrize("name, summary, guideline", [
    ("anastrozole", "Anastrozole 1 mg daily for 12 months", "ASCO 2019"),
    ("letrozole", "Letrozole 2.5 mg daily for 12 months", "ASCO 2019"),
    ("leuprolide-depot", "Leuprolide 22.5 mg every 3 months", "CMS645"),
    ("abiraterone", "Abiraterone 1000 mg daily for 6 months", "CMS645"),
])
def test_aromatase_inhibitors_and_androgen_deprivation_ask_for_a_baseline_dxa(server, name, summary, guideline):
    card = card_of(server, name)
    assert card["summary"] == f"{summary}: baseline DXA and calcium/vitamin D ({guideline})"
    assert labels(card) == ["Order DXA bone density scan", "Calcium and vitamin D supplement"]
    assert "ACR 2022 fracture risk" not in card["detail"]          # the glucocorticoid strata are not theirs


def test_already_on_alendronate_gives_no_card(server):
    assert card_of(server, "already-on-alendronate") is None


def test_a_recent_dxa_is_not_suggested_again(server):
    card = card_of(server, "recent-dxa")
    assert "DXA on 2025-12-12: no new DXA is suggested" in card["detail"]
    assert not any("DXA" in label for label in labels(card))
    assert "Alendronate 70 mg once weekly (consider)" in labels(card)


def test_egfr_28_gives_no_bisphosphonate_and_says_why(server):
    card = card_of(server, "egfr-28")
    assert "ACR 2022 fracture risk: high" in card["detail"]
    assert "No bisphosphonate draft: check first" in card["detail"]
    assert "eGFR 28 on 2026-05-01 is below 35 for alendronate \\(label\\)" in card["detail"]
    assert "Kidney function: eGFR 28" in card["detail"] and "boxed warning" in card["detail"]
    assert not any(r["resourceType"] == "MedicationRequest" and "46041" in json.dumps(r)
                   for _, r in medication_drafts(card))


def test_order_select_evaluates_only_the_selected_orders(server):
    card = card_of(server, "order-select-two-selections")
    assert card["summary"] == "Prednisone 20 mg daily for 3 months: protect bone (ACR 2022)"
    assert "etrozole" not in card["detail"]                     # draft-3 is in draftOrders but not selected
    body = order_fixture("order-select-two-selections")
    body["context"]["selections"] = ["MedicationRequest/draft-1"]      # lisinopril only
    assert call(server, "", body).json()["cards"] == []
    body["context"]["selections"] = ["MedicationRequest/draft-3"]      # letrozole only
    assert call(server, "", body).json()["cards"][0]["summary"].startswith("Letrozole 2.5 mg daily")


def test_order_sign_evaluates_every_draft_and_names_them(server):
    body = order_fixture("order-select-two-selections")
    body["hook"] = "order-sign"
    del body["context"]["selections"]
    for e in body["context"]["draftOrders"]["entry"]:      # drafts of their own (not the ones order-select showed)
        e["resource"]["id"] = e["resource"]["id"].replace("draft", "sign")
    card = call(server, "", body).json()["cards"][0]
    assert card["summary"].startswith("Prednisone 20 mg daily for 3 months")     # glucocorticoid leads
    assert "Letrozole 2.5 mg daily for 3 months" in card["detail"]


def test_bisphosphonate_guards_each_name_what_fails(server):
    """From the moderate-risk prednisone patient: low 25-OH D, high calcium, achalasia, pregnancy."""
    base = order_fixture("prednisone-10mg-90-days")

    def with_chart(edit) -> dict:
        body = copy.deepcopy(base)
        edit(body["prefetch"])
        card = call(server, "", body).json()["cards"][0]
        assert not any(s["isRecommended"] is False for s in card["suggestions"])
        return card

    def set_result(loinc, value):
        def edit(prefetch):
            for key in ("observations", "boneHealthObservations"):
                for e in prefetch[key].get("entry", []):
                    if e["resource"]["code"]["coding"][0]["code"] == loinc:
                        e["resource"]["valueQuantity"]["value"] = value
        return edit

    assert "25-OH vitamin D 14 ng/mL" in with_chart(set_result("62292-8", 14))["detail"]
    assert "calcium 11.2 mg/dL" in with_chart(set_result("17861-6", 11.2))["detail"]

    def achalasia(prefetch):
        prefetch["conditions"].setdefault("entry", []).append({"resource": {
            "resourceType": "Condition", "id": "ach", "subject": {"reference": f"Patient/{base['context']['patientId']}"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "45564002", "display": "Achalasia"}],
                     "text": "Achalasia of cardia"}}})
    assert "oesophageal disorder on record \\(Achalasia of cardia" in with_chart(achalasia)["detail"]


# ---- the same plumbing as patient-view -------------------------------------------------------------
def test_feedback_cors_metrics_and_logs_work_for_the_order_services(server):
    r = call(server, "prednisone-10mg-90-days")
    card = r.json()["cards"][0]
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    fb = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-06-30T09:00:00Z",
                        "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "5 days only"}}]}
    stored = requests.post(server.base + SIGN + "/feedback", json=fb, timeout=5)
    assert stored.status_code == 200 and stored.json() == {"stored": 1, "received": 1}
    metrics = requests.get(server.base + "/metrics", timeout=5).text
    assert re.search(r'cds_requests_total\{service="service",service_id="bone-protection-order-sign",status="200"\}',
                     metrics)
    assert 'cds_cards_total{indicator="warning",service_id="bone-protection-order-sign"}' in metrics
    log_lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    served = [x for x in log_lines if x.get("event") == "request" and x.get("service_id") == "bone-protection-order-sign"
              and x["status"] == 200]
    assert served and all(x["hook"] in ("order-sign", None) and x["cards"] <= 1 for x in served if "cards" in x)
    assert base_patient_id() not in server.logs()                  # no patient data in the logs


def base_patient_id() -> str:
    return order_fixture("prednisone-10mg-90-days")["context"]["patientId"]


# ---- regimen words (unit) ---------------------------------------------------------------------------
@pytest.mark.parametrize("mg, per_day, days, single, expected", [
    (10, 1, 90, False, "Prednisone 10 mg daily for 3 months"),
    (20, 2, 5, False, "Prednisone 20 mg twice daily for 5 days"),
    (5, 1, 28, False, "Prednisone 5 mg daily for 4 weeks"),
    (5, 1, 1, False, "Prednisone 5 mg daily"),
    (70, 1 / 7, 84, False, "Prednisone 70 mg weekly for 12 weeks"),
    (22.5, None, 1, True, "Prednisone 22.5 mg injection"),
])
def test_regimen_text(mg, per_day, days, single, expected):
    start = date(2026, 6, 30)
    from datetime import timedelta
    m = MedicationExposure("MedicationRequest/x", "MedicationRequest", [], "", "", "draft", start,
                           start + timedelta(days=days - 1), False, True, mg, per_day, None, single_dose=single,
                           planned=True)
    assert regimen_text(m, "prednisone") == expected


def test_every_drug_the_prescribing_card_orders_has_a_verified_code_or_none():
    cat = load_catalog()
    for name, draft in cat.orders["drafts"].items():
        if "code" in draft:
            assert draft["code"]["verified"] is True and draft["code"]["source"], name


def test_the_sandboxs_draft_with_a_malformed_category_still_gets_its_card(server):
    """The CDS Hooks sandbox sends `category` as an object (FHIR: a list); a draft is checked on what is
    read from it, so the order still gets its card (and a malformed dosage still does not)."""
    body = order_fixture("prednisone-10mg-90-days")
    d = body["context"]["draftOrders"]["entry"][0]["resource"]
    d["category"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                                 "code": "community"}]}
    assert call(server, "", body).json()["cards"][0]["summary"].startswith("Prednisone 10 mg daily for 3 months")
    d["dosageInstruction"][0]["timing"] = "daily"                  # an element we read, malformed: no exposure
    assert call(server, "", body).json()["cards"] == []
