"""Reading FHIR Bundles of one patient (collection, searchset or transaction) as prefetch data.

Synthea and bulk tools write references as `urn:uuid:` fullUrls; these are rewritten to
`Type/id` so that references resolve the way they would on a FHIR server.
"""
from __future__ import annotations

import re
import uuid
from operator import itemgetter

from ..errors import BadRequest
from ..jsonutil import as_list

_URN = re.compile(r"^urn:uuid:([0-9a-fA-F-]{36})$")
# where each resource type goes among the service's prefetch keys
PREFETCH_KEY = {
    "Condition": "conditions",
    "MedicationRequest": "medicationRequests",
    "MedicationAdministration": "medicationAdministrations",
    "Medication": "medicationRequests",
    "MedicationStatement": "medicationStatements",
    "MedicationDispense": "medicationDispenses",
    "Observation": "observations",
    "Procedure": "procedures",
}


def bundle_resources(bundle: dict) -> list[dict]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadRequest("Not a FHIR Bundle.")
    entries = [e for e in as_list(bundle.get("entry")) if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    refs: dict[str, str] = {}
    resources = []
    for e in entries:
        res = e["resource"]
        rt = res.get("resourceType")
        if not isinstance(rt, str):
            continue
        full = e.get("fullUrl") if isinstance(e.get("fullUrl"), str) else ""
        m = _URN.match(full)
        res = _identified(res, m.group(1) if m else None)
        if full:
            refs[full] = f"{rt}/{res['id']}"
            if full.startswith(("http://", "https://")) and "/" + rt + "/" in full:
                refs[full.split("/_history")[0]] = f"{rt}/{res['id']}"
        resources.append(res)
    if refs:
        resources = [_rewrite(r, refs) for r in resources]
    return resources


# (type, id): every resource read here has both (`_identified`); a C key, not a Python call per resource
_CANONICAL = itemgetter("resourceType", "id")


def _rewrite(node, refs: dict[str, str]):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in refs:
                out[k] = refs[v]
            else:
                out[k] = _rewrite(v, refs)
        return out
    if isinstance(node, list):
        return [_rewrite(v, refs) for v in node]
    return node


def _identified(res: dict, given: str | None = None) -> dict:
    """The resource with an id: its own, else `given` (its urn:uuid fullUrl's uuid), else a random one."""
    return res if isinstance(res.get("id"), str) else {**res, "id": given or uuid.uuid4().hex}


def loose_resources(values: list) -> list[dict]:
    """One patient's resources as an export lists them (no Bundle, no fullUrl), read as `bundle_resources` reads a
    Bundle's entries: what is not a FHIR resource is left out, a resource without an id is given one."""
    return [_identified(res) for res in values if type(res) is dict and isinstance(res.get("resourceType"), str)]


def request_from_bundle(bundle: dict, hook_instance: str | None = None) -> dict:
    """A CDS Hooks patient-view request whose prefetch holds the Bundle's resources, in one canonical order
    (type, then id): the engine lists evidence in the order it reads it, so a patient's lines from `evaluate`
    and from `screen` (whose export arrives in any order, in any partition) are the same."""
    return request_from_resources(bundle_resources(bundle), hook_instance)


def request_from_resources(resources: list[dict], hook_instance: str | None = None) -> dict:
    """`request_from_bundle` for resources already read (`bundle_resources`, `loose_resources`): a screen builds
    each patient's request here without wrapping its lines in a Bundle first."""
    resources = sorted(resources, key=_CANONICAL)
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    if len(patients) != 1:
        raise BadRequest(f"The Bundle must hold exactly one Patient (found {len(patients)}).")
    patient = patients[0]
    prefetch: dict = {"patient": patient}
    for key in ("conditions", "medicationRequests", "medicationStatements", "medicationAdministrations",
                "medicationDispenses", "observations", "boneHealthObservations", "procedures"):
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    for r in resources:
        key = PREFETCH_KEY.get(r["resourceType"])
        if key:
            prefetch[key]["entry"].append({"resource": r})
    return {
        "hook": "patient-view",
        "hookInstance": hook_instance or str(uuid.uuid4()),
        "context": {"patientId": patient["id"], "userId": "Practitioner/offline-evaluation"},
        "prefetch": prefetch,
    }
