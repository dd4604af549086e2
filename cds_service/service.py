"""The secondary-osteoporosis CDS service: request -> prefetch -> patient record -> findings -> cards."""
from __future__ import annotations

import re

import time
from dataclasses import dataclass
from datetime import date

from .cards import CardRenderer
from .catalog import Catalog
from .engine import Assessment, Engine, observation_windows
from .errors import BadRequest, PrefetchUnavailable
from .fhir_client import FhirClient
from .prefetch import PrefetchResolver, PrefetchResult, build_templates
from .record import RecordBuilder

SERVICE_ID = "secondary-osteoporosis"
HOOK = "patient-view"


@dataclass
class Invocation:
    response: dict
    assessment: Assessment
    prefetch: PrefetchResult
    timings: dict          # milliseconds per stage: prefetch, engine, render


def validate_request(body: object) -> dict:
    """Check a CDS Hooks 2.0 patient-view request; unknown members are ignored."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    hook = body.get("hook")
    if not isinstance(hook, str) or not hook:
        raise BadRequest("'hook' is required.")
    if hook != HOOK:
        raise BadRequest(f"This service answers the '{HOOK}' hook, not '{hook[:64]}'.")
    if not isinstance(body.get("hookInstance"), str) or not body["hookInstance"].strip():
        raise BadRequest("'hookInstance' is required.")
    context = body.get("context")
    if not isinstance(context, dict):
        raise BadRequest("'context' is required and must be an object.")
    pid = context.get("patientId")
    if not isinstance(pid, str) or not pid.strip():
        raise BadRequest("'context.patientId' is required.")
    for key in ("userId", "encounterId"):
        if key in context and not isinstance(context[key], str):
            raise BadRequest(f"'context.{key}' must be a string.")
    prefetch = body.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, dict):
        raise BadRequest("'prefetch' must be an object.")
    if prefetch and any(v is not None and not isinstance(v, dict) for v in prefetch.values()):
        raise BadRequest("Each 'prefetch' value must be a FHIR resource (an object) or null.")
    server = body.get("fhirServer")
    if server is not None and (not isinstance(server, str) or not _SERVER_URL.fullmatch(server)):
        raise BadRequest("'fhirServer' must be an http(s) URL.")
    auth = body.get("fhirAuthorization")
    if auth is not None:
        if server is None:
            raise BadRequest("'fhirAuthorization' requires 'fhirServer'.")
        if not isinstance(auth, dict):
            raise BadRequest("'fhirAuthorization' must be an object.")
        for key in ("access_token", "token_type", "scope", "subject"):
            if not isinstance(auth.get(key), str) or not auth[key]:
                raise BadRequest(f"'fhirAuthorization.{key}' is required.")
        if auth["token_type"].lower() != "bearer":
            raise BadRequest("'fhirAuthorization.token_type' must be 'Bearer'.")
        expires = auth.get("expires_in")
        if isinstance(expires, float) and expires.is_integer():
            expires = int(expires)                 # 300.0 is a JSON integer too
        if not isinstance(expires, int) or isinstance(expires, bool) or not 0 <= expires <= 2**31 - 1:
            raise BadRequest("'fhirAuthorization.expires_in' must be a whole number of seconds.")
        if "patient" in auth and auth["patient"] != pid:
            raise BadRequest("'fhirAuthorization.patient' does not match 'context.patientId'.")
    if "extension" in body and not isinstance(body["extension"], dict):
        raise BadRequest("'extension' must be an object.")
    return body


# http(s), a host, no whitespace and no credentials in the authority (openapi.yaml says the same)
_SERVER_URL = re.compile("https?://[^\u0000-\u0020\u007f/?#@]+([/?#][^\u0000-\u0020\u007f]*)?")


class OsteoporosisService:
    """Holds everything built once at start-up; `invoke` is the per-request hot path."""

    def __init__(self, catalog: Catalog, fhir_client: FhirClient, fhir_timeout: float = 3.0, page_size: int = 200,
                 fhir_allowlist: tuple[str, ...] = ()):
        self.catalog = catalog
        self.templates = build_templates(catalog, page_size)
        self.resolver = PrefetchResolver(self.templates, fhir_client, fhir_timeout, fhir_allowlist)
        self.records = RecordBuilder(catalog, read_windows=observation_windows(catalog))
        self.engine = Engine(catalog)
        self.renderer = CardRenderer(catalog)

    def discovery(self) -> dict:
        return {
            "hook": HOOK,
            "id": SERVICE_ID,
            "title": "Secondary osteoporosis causes",
            "description": ("Finds recorded causes of secondary osteoporosis (medicines such as long-term "
                            "glucocorticoids, and endocrine, GI, rheumatologic, hematologic, renal and lifestyle "
                            "causes), shows the evidence and offers the guideline workup."),
            "prefetch": dict(self.templates),
            "usageRequirements": ("Needs read access to Patient, Condition, MedicationRequest, MedicationStatement, "
                                  "Medication, Observation and Procedure for the patient in context."),
        }

    def invoke(self, body: object, as_of: date) -> Invocation:
        t0 = time.perf_counter()
        request = validate_request(body)
        prefetch = self.resolver.resolve(request)
        t1 = time.perf_counter()
        patient_id = request["context"]["patientId"]
        record = self.records.build(prefetch.data, patient_id, as_of)
        if record.failed_keys:
            # a Bundle that carries an error outcome: ask the FHIR server for that key instead
            t = time.perf_counter()
            prefetch = self.resolver.resolve(request, failed=frozenset(record.failed_keys))
            t1 += time.perf_counter() - t                 # counted as prefetch time, not engine time
            record = self.records.build(prefetch.data, patient_id, as_of)
            if record.failed_keys:
                raise PrefetchUnavailable("The FHIR server returned an error outcome for "
                                          f"'{record.failed_keys[0]}'.")
        if not record.has_patient:
            raise PrefetchUnavailable("The Patient resource for the patient in context is not in the prefetch data.")
        assessment = self.engine.assess(record)
        t2 = time.perf_counter()
        response = {"cards": self.renderer.render(assessment)}
        t3 = time.perf_counter()
        timings = {"prefetch_ms": round((t1 - t0) * 1000, 2), "engine_ms": round((t2 - t1) * 1000, 2),
                   "render_ms": round((t3 - t2) * 1000, 2)}
        return Invocation(response, assessment, prefetch, timings)


def explain(assessment: Assessment) -> list[dict]:
    """The --explain findings list: every cause found, the resources it rests on, and whether it is only
    listed on a card that fires for another reason."""
    return [{"cause": f.cause.id, "evidence": f.references, "listed_only": not f.fires_alone}
            for f in assessment.findings]


def explain_context(assessment: Assessment) -> dict:
    """The --explain context a reviewer needs to check the card: treatment gap, current therapy,
    kidney caution, latest eGFR and pregnancy."""
    ctx = assessment.context
    course = ctx.courses[0] if ctx.courses else None
    return {
        "treatment_gap": ctx.treatment_gap,
        "on_treatment": {"drug": course.drug, "since": course.since.isoformat()} if course else None,
        "next_decision": ctx.next_decision,
        "kidney_caution": bool(ctx.kidney_caution),
        "latest_egfr": {"value": round(ctx.latest_egfr[0], 1), "date": ctx.latest_egfr[1].isoformat()}
        if ctx.latest_egfr else None,
        "latest_t_score": {"value": round(ctx.latest_t_score[0], 1), "site": ctx.latest_t_score[1],
                           "date": ctx.latest_t_score[2].isoformat()} if ctx.latest_t_score else None,
        "pregnant": ctx.pregnant is not None,
    }
