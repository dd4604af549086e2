"""Prefetch templates (built from the catalog's codes) and their resolution for a request.

CDS Hooks 2.0: the client may satisfy none, some or all templates. A key that is absent, or
whose value is an OperationOutcome (or a Bundle carrying an error outcome), is fetched from
fhirServer; a `null` value means "no data"; a paginated Bundle is completed via its `next`
links. If anything a rule needs cannot be had, the request gets 412.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from ..knowledge.catalog import LOINC, Catalog, normalize_system
from .. import metrics
from .allowlist import ServerAllowlist
from ..errors import PrefetchUnavailable
from .fhir_client import FhirClient, FhirError, FetchStats
from ..jsonutil import as_list, is_error_outcome

TOKEN_RE = re.compile(r"\{\{\s*([A-Za-z.]+)\s*\}\}")
USER_TOKENS = {"userPractitionerId": "Practitioner", "userPractitionerRoleId": "PractitionerRole",
               "userPatientId": "Patient", "userRelatedPersonId": "RelatedPerson"}


def build_templates(catalog: Catalog, page_size: int = 200) -> dict[str, str]:
    """The discovery prefetch templates; Observation searches are filtered to the codes rules read."""
    rule_codes: set[str] = set()
    for rule in catalog.observation_rules.values():
        for key in ("loinc", "calcium_loinc", "albumin_loinc", "pth_loinc", "weight_loinc", "height_loinc"):
            rule_codes.update(rule.get(key, []))
    for cause in catalog.causes.values():
        for c in cause.detect.get("codes", []):
            if normalize_system(c["system"]) == LOINC:
                rule_codes.add(c["code"])
    context_codes = set(catalog.context_loincs) - rule_codes

    def obs(codes: set[str]) -> str:
        joined = ",".join(f"{LOINC}|{c}" for c in sorted(codes))
        return f"Observation?patient={{{{context.patientId}}}}&code={joined}&_count={page_size}"

    return {
        "patient": "Patient/{{context.patientId}}",
        "conditions": f"Condition?patient={{{{context.patientId}}}}&_count={page_size}",
        "medicationRequests": f"MedicationRequest?patient={{{{context.patientId}}}}&_count={page_size}"
                              "&_include=MedicationRequest:medication",
        "medicationStatements": f"MedicationStatement?patient={{{{context.patientId}}}}&_count={page_size}"
                                "&_include=MedicationStatement:medication",
        # clinic-given drugs (depot GnRH agonists, DMPA, zoledronic acid) are often only administrations
        "medicationAdministrations": f"MedicationAdministration?patient={{{{context.patientId}}}}&_count={page_size}"
                                     "&_include=MedicationAdministration:medication",
        # pharmacy fills: in payer and pharmacy-fed exports the only evidence of use
        "medicationDispenses": f"MedicationDispense?patient={{{{context.patientId}}}}&_count={page_size}"
                               "&_include=MedicationDispense:medication",
        "observations": obs(rule_codes),
        "boneHealthObservations": obs(context_codes),
        "procedures": f"Procedure?patient={{{{context.patientId}}}}&_count={page_size}",
    }


def resolve_template(template: str, context: dict) -> str | None:
    """Substitute 2.0 tokens as a client would; None when a token has no value."""
    missing = False

    def sub(m: re.Match) -> str:
        nonlocal missing
        token = m.group(1)
        value = None
        if token.startswith("context."):
            value = context.get(token[len("context."):])
        elif token in USER_TOKENS:
            user = context.get("userId")
            if isinstance(user, str) and user.startswith(USER_TOKENS[token] + "/"):
                value = user.split("/", 1)[1]
        if not isinstance(value, str) or not value:
            missing = True
            return ""
        return quote(value, safe="")

    out = TOKEN_RE.sub(sub, template)
    return None if missing else out


# Keys added after clients were configured from an earlier discovery document: a client that does not send one and
# gives no fhirServer to fetch it from is served without it (a pharmacy fill is extra evidence, not the core record).
OPTIONAL_KEYS = frozenset({"medicationDispenses"})


def _failed(value: dict) -> bool:
    """An OperationOutcome, or a Bundle whose entries carry an error outcome, is a failed key.
    (For the client's prefetch the record build finds error entries in its own pass.)"""
    rt = value.get("resourceType")
    if rt == "OperationOutcome":
        return True
    entries = value.get("entry") if rt == "Bundle" else None
    return type(entries) is list and any(
        type(e) is dict and type(e.get("resource")) is dict and is_error_outcome(e["resource"]) for e in entries)


def _has_next(value: dict) -> bool:
    return value.get("resourceType") == "Bundle" and any(
        isinstance(l, dict) and l.get("relation") == "next" for l in as_list(value.get("link")))


@dataclass
class PrefetchResult:
    data: dict
    fetched_keys: list[str] = field(default_factory=list)
    stats: FetchStats = field(default_factory=FetchStats)


class PrefetchResolver:
    def __init__(self, templates: dict[str, str], client: FhirClient, timeout: float, allowlist: tuple[str, ...] = ()):
        self.templates = templates
        self.client = client
        self.timeout = timeout
        self.allowlist = ServerAllowlist(allowlist)

    def resolve(self, request: dict, failed: frozenset[str] = frozenset()) -> PrefetchResult:
        """The prefetch data for every template key, querying fhirServer for the keys the client
        left out or could not answer. Error outcomes inside a Bundle are found by the record build
        (it reads every entry anyway), which hands those keys back here as `failed`."""
        given = request.get("prefetch") or {}
        context = request["context"]
        data: dict = {}
        missing: dict[str, str] = {}
        partial: list[str] = []
        server = request.get("fhirServer")
        for key, template in self.templates.items():
            value = given.get(key, ...)
            if value is None or (value is ... and key in OPTIONAL_KEYS and not server):
                data[key] = None                       # the client had no data (or predates this key)
            elif value is ... or not isinstance(value, dict) or value.get("resourceType") == "OperationOutcome" \
                    or key in failed:
                query = resolve_template(template, context)
                if query is None:
                    raise PrefetchUnavailable(f"Prefetch key '{key}' is missing and its query cannot be built from the context.")
                missing[key] = query
            elif _has_next(value):
                data[key] = value
                partial.append(key)
            else:
                data[key] = value
        result = PrefetchResult(data)
        if not missing and not partial:
            return result
        if not isinstance(server, str) or not server:
            keys = ", ".join(sorted(missing) + partial)
            raise PrefetchUnavailable(f"Prefetch incomplete ({keys}) and the request has no fhirServer to query.")
        if not self.allowlist.allows(server):
            metrics.FALLBACK_FAILURES.labels("NotAllowlisted").inc()
            raise PrefetchUnavailable("Prefetch incomplete and the request's fhirServer is not on this service's allowlist "
                                     "(or is not a plain http(s) URL without credentials).")
        auth = request.get("fhirAuthorization")
        token = auth.get("access_token") if isinstance(auth, dict) else None
        deadline = time.monotonic() + self.timeout     # one deadline for all fallback work
        metrics.FALLBACK_CALLS.inc()
        stats = result.stats                           # requests and bytes of every page fetched
        try:
            fetched = self.client.fetch_many(server, token, missing, self.timeout, stats) if missing else {}
            for key in partial:
                fetched[key] = self.client.follow_next(server, token, data[key], max(0.0, deadline - time.monotonic()),
                                                       stats)
        except FhirError as exc:
            metrics.FALLBACK_FAILURES.labels(type(exc).__name__).inc()
            keys = ", ".join(sorted(missing) + partial)
            raise PrefetchUnavailable(f"Prefetch incomplete ({keys}) and the FHIR server could not supply it: {exc}") from exc
        for key, value in fetched.items():
            if _failed(value):
                raise PrefetchUnavailable(f"The FHIR server returned an error outcome for '{key}'.")
            data[key] = value
        result.fetched_keys = sorted(fetched)
        return result
