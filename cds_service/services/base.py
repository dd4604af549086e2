"""What every CDS service shares: request validation, prefetch, the patient record, the invocation.

A service module says only which hook it answers, which context it needs, what it decides and which
card it renders; the path is the same for all: request -> prefetch -> patient record -> decision ->
cards -> response.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import date

from ..rendering.cards import CardRenderer
from ..knowledge.catalog import Catalog
from ..clinical.assessment import Assessment
from ..clinical.engine import Engine, observation_windows
from ..errors import BadRequest, PrefetchUnavailable
from ..fhir.fhir_client import FhirClient
from ..clinical.orders import ShownDrafts
from ..fhir.prefetch import PrefetchResolver, PrefetchResult, build_templates
from ..fhir.record import PatientRecord, RecordBuilder


@dataclass
class Invocation:
    response: dict
    assessment: Assessment
    prefetch: PrefetchResult
    timings: dict          # milliseconds per stage: prefetch, engine, render


class Toolkit:
    """Everything built once at start-up and shared by every service: the catalog, the prefetch
    templates and resolver, the record builder, the engine and the card renderer."""

    def __init__(self, catalog: Catalog, fhir_client: FhirClient, fhir_timeout: float = 3.0, page_size: int = 200,
                 fhir_allowlist: tuple[str, ...] = ()):
        self.catalog = catalog
        self.templates = build_templates(catalog, page_size)
        self.resolver = PrefetchResolver(self.templates, fhir_client, fhir_timeout, fhir_allowlist)
        self.records = RecordBuilder(catalog, read_windows=observation_windows(catalog))
        self.engine = Engine(catalog)
        self.renderer = CardRenderer(catalog)
        self.shown_drafts = ShownDrafts()          # one prescribing card per draft across order-select and order-sign


class CdsService:
    """One CDS service. Subclasses set the class attributes and implement `check_context` (the hook's
    own context members), `drafts` (orders to read as planned, if any) and `decide`."""

    id: str
    hook: str
    title: str
    description: str
    snoozable = False                  # patient-view only: a card the clinician dealt with stays away a while

    def __init__(self, kit: Toolkit):
        self.kit = kit

    @property
    def catalog(self) -> Catalog:
        return self.kit.catalog

    def discovery(self) -> dict:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": dict(self.kit.templates),
            "usageRequirements": ("Needs read access to Patient, Condition, MedicationRequest, MedicationStatement, "
                                  "MedicationAdministration, MedicationDispense, Medication, Observation and Procedure "
                                  "for the patient "
                                  "in context."),
        }

    # ---- the hook's contract ------------------------------------------------------------------
    def check_context(self, context: dict) -> None:
        """Refuse (BadRequest) a context that lacks what this hook requires."""

    def drafts(self, request: dict) -> list[dict]:
        """Orders being placed, read into the record as planned exposures."""
        return []

    def decide(self, request: dict, prefetch: PrefetchResult, record: PatientRecord) -> tuple[Assessment, object]:
        """The engine's assessment of the record, and what this service concludes from it."""
        raise NotImplementedError

    def render(self, decision: object) -> list[dict]:
        """The cards for that conclusion (none, or one)."""
        raise NotImplementedError

    # ---- the request path -----------------------------------------------------------------------
    def invoke(self, body: object, as_of: date) -> Invocation:
        t0 = time.perf_counter()
        request = validate_request(body, self.hook)
        self.check_context(request["context"])
        prefetch, record, prefetch_s = self.gather(request, as_of)
        t1 = t0 + prefetch_s
        assessment, decision = self.decide(request, prefetch, record)
        t2 = time.perf_counter()
        cards = self.render(decision)
        t3 = time.perf_counter()
        timings = {"prefetch_ms": round((t1 - t0) * 1000, 2), "engine_ms": round((t2 - t1) * 1000, 2),
                   "render_ms": round((t3 - t2) * 1000, 2)}
        return Invocation({"cards": cards}, assessment, prefetch, timings)

    def gather(self, request: dict, as_of: date) -> tuple[PrefetchResult, PatientRecord, float]:
        """The prefetch (completed from the FHIR server where the client left keys out) and the patient
        record built from it; the seconds spent fetching."""
        t0 = time.perf_counter()
        kit = self.kit
        prefetch = kit.resolver.resolve(request)
        fetched = time.perf_counter() - t0
        patient_id = request["context"]["patientId"]
        drafts = self.drafts(request)
        record = kit.records.build(prefetch.data, patient_id, as_of, drafts)
        if record.failed_keys:
            # a Bundle that carries an error outcome: ask the FHIR server for that key instead
            t = time.perf_counter()
            prefetch = kit.resolver.resolve(request, failed=frozenset(record.failed_keys))
            fetched += time.perf_counter() - t                # counted as prefetch time, not engine time
            record = kit.records.build(prefetch.data, patient_id, as_of, drafts)
            if record.failed_keys:
                raise PrefetchUnavailable("The FHIR server returned an error outcome for "
                                          f"'{record.failed_keys[0]}'.")
        if not record.has_patient:
            raise PrefetchUnavailable("The Patient resource for the patient in context is not in the prefetch data.")
        return prefetch, record, fetched


def validate_request(body: object, hook: str) -> dict:
    """Check the members every CDS Hooks 2.0 request carries; unknown members are ignored. The
    hook's own context members are the service's `check_context`."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    given = body.get("hook")
    if not isinstance(given, str) or not given:
        raise BadRequest("'hook' is required.")
    if given != hook:
        raise BadRequest(f"This service answers the '{hook}' hook, not '{given[:64]}'.")
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
