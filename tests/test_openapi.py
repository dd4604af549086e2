"""openapi.yaml describes what the service really does."""
from __future__ import annotations

import re

import pytest
import yaml
from jsonschema import Draft202012Validator

from .conftest import LABELS, ROOT, SERVICE_URL, fixture_request, issue_cards

DOC = yaml.safe_load((ROOT / "openapi.yaml").read_text())


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": DOC["components"]},
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


SERVICE_IDS = ["secondary-osteoporosis", "bone-protection-order-sign", "bone-protection-order-select"]


def openapi_routes() -> set[tuple[str, str]]:
    """Each service has its own path (its own request schema); Flask serves them all on one rule."""
    out = set()
    for path, item in DOC["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "delete", "patch"):
                path = re.sub(r"^/cds-services/(" + "|".join(SERVICE_IDS) + ")$", "/cds-services/{service_id}", path)
                out.add((re.sub(r"\{(\w+)\}", r"<\1>", path), method.upper()))
    return out


def test_every_route_is_described_and_every_description_is_a_route(app):
    routes = {(rule.rule, m) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == openapi_routes()
    assert [s.id for s in app.extensions["cds"]["services"]] == SERVICE_IDS
    assert all(f"/cds-services/{sid}" in DOC["paths"] for sid in SERVICE_IDS)
    Draft202012Validator.check_schema({"components": DOC["components"]})


def test_discovery_matches_the_schema(client):
    validator("Discovery").validate(client.get("/cds-services").get_json())


@pytest.mark.parametrize("rel", sorted(LABELS["patients"])[::7])
def test_service_responses_match_the_schema(client, rel):
    request = fixture_request(rel)
    validator("PatientViewRequest").validate(request)
    validator("HookResponse").validate(client.post(SERVICE_URL, json=request).get_json())


@pytest.mark.parametrize("path", sorted((ROOT / "fixtures" / "orders").glob("*.json")), ids=lambda p: p.stem)
def test_order_requests_and_responses_match_the_schema(client, path):
    import json
    request = json.loads(path.read_text())
    schema, sid = ("OrderSelectRequest", SERVICE_IDS[2]) if request["hook"] == "order-select" \
        else ("OrderSignRequest", SERVICE_IDS[1])
    validator(schema).validate(request)
    validator("HookResponse").validate(client.post(f"/cds-services/{sid}", json=request).get_json())


def test_error_bodies_and_statuses_are_described(client):
    cases = {"400": client.post(SERVICE_URL, data=b"{", content_type="application/json"),
             "404": client.post("/cds-services/other", json={}),
             "412": client.post(SERVICE_URL, json={"hook": "patient-view", "hookInstance": "x",
                                                   "context": {"patientId": "p"}})}
    described = DOC["paths"][SERVICE_URL]["post"]["responses"]
    for status, resp in cases.items():
        assert resp.status_code == int(status) and status in described
        validator("OperationOutcome").validate(resp.get_json())


def test_feedback_request_examples_match_the_schema(client):
    body = {"feedback": [{"card": "c", "outcome": "accepted", "acceptedSuggestions": [{"id": "s"}],
                          "outcomeTimestamp": "2026-06-30T10:00:00Z"}]}
    validator("FeedbackRequest").validate(body)
    issue_cards(client.application, "c")
    assert client.post(SERVICE_URL + "/feedback", json=body).status_code == 200
