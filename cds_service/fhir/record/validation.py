"""Typing with fhir.resources: only resources that drive a finding are validated, and those seen before are
remembered by digest; malformed dates are left out, never fatal."""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from datetime import date
from hashlib import blake2b
from typing import Any

import orjson
from pydantic import ValidationError



_MODELS: dict[str, Any] = {}


def _model(resource_type: str):
    """fhir.resources R4B model class, imported lazily (the import is the expensive part)."""
    if resource_type not in _MODELS:
        import importlib
        module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
        _MODELS[resource_type] = getattr(module, resource_type)
    return _MODELS[resource_type]


TYPED = ("Patient", "Condition", "Observation", "Procedure", "MedicationRequest",
         "MedicationStatement", "MedicationAdministration", "MedicationDispense", "Medication")


def warm_models() -> None:
    """Import the models at start-up so the first request does not pay for it."""
    for rt in TYPED:
        _model(rt)


class ValidatedResources:
    """Which resources fhir.resources has already accepted, for this process.

    Validation is a pure function of a resource's content, and the same chart is opened again
    and again (by each user, at each visit), so a resource once found valid is not validated
    again. Only a 16-byte digest of its JSON is kept, never the resource; the set is bounded
    (least recently used out). Invalid resources are not remembered: they are checked each time.
    """

    def __init__(self, capacity: int = 16384):
        self.capacity = capacity
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._digests)

    def is_valid(self, resource: dict) -> bool:
        try:
            digest = blake2b(orjson.dumps(resource), digest_size=16).digest()
        except (TypeError, orjson.JSONEncodeError):
            digest = None                         # not plain JSON data: validate, do not remember
        if digest is not None and self.capacity:
            with self._lock:
                if digest in self._digests:
                    self._digests.move_to_end(digest)
                    return True
        try:
            _model(resource["resourceType"]).model_validate(resource)
        except (ValidationError, ValueError, TypeError, KeyError):
            return False
        if digest is not None and self.capacity:
            with self._lock:
                self._digests[digest] = None
                if len(self._digests) > self.capacity:
                    self._digests.popitem(last=False)
        return True


# FHIR date / dateTime / instant (R4 datatypes), checked again as a calendar date below
_FHIR_DATE_RE = re.compile(r"\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])(T([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)"
                           r"(\.\d+)?(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))?)?)?)?")
_DATE_FIELDS = ("birthDate", "deceasedDateTime", "onsetDateTime", "abatementDateTime", "recordedDate", "authoredOn",
                "effectiveDateTime", "effectiveInstant", "issued", "performedDateTime", "dateAsserted")
_PERIOD_FIELDS = ("onsetPeriod", "abatementPeriod", "effectivePeriod", "performedPeriod")


def _malformed_date(value: Any) -> bool:
    if not isinstance(value, str) or not _FHIR_DATE_RE.fullmatch(value):
        return True
    return len(value) >= 10 and parse_date(value) is None        # 2021-02-30: the right shape, no such day


def without_malformed_dates(res: dict) -> dict | None:
    """A copy of the resource without its malformed top-level dates (a birthDate of "1960-13-45", an
    onset of "yesterday"), or None when none is malformed: the resource is invalid for another reason."""
    out = dict(res)
    for key in _DATE_FIELDS:
        if key in out and _malformed_date(out[key]):
            del out[key]
    for key in _PERIOD_FIELDS:
        period = out.get(key)
        if isinstance(period, dict):
            kept = {k: v for k, v in period.items() if k not in ("start", "end") or not _malformed_date(v)}
            if kept != period:
                out[key] = kept
    return out if out != res else None


_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")

# dates a clinical record can hold: anything outside is an entry error and read as no date (adding a supply to a
# date in year 9999 would leave the calendar)
MIN_YEAR, MAX_YEAR = 1800, 2200


def parse_date(value: Any) -> date | None:
    """FHIR date/dateTime/instant -> date (partial dates take their first day)."""
    if not isinstance(value, str):
        return None
    if len(value) >= 10 and value[4] == "-" and value[7] == "-":
        try:
            d = date.fromisoformat(value[:10])       # the common full date: C fast path
            return d if MIN_YEAR <= d.year <= MAX_YEAR else None
        except ValueError:
            pass
    m = _DATE_RE.match(value[:40].strip())
    if not m:
        return None
    try:
        d = date(int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1))
    except ValueError:
        return None
    return d if MIN_YEAR <= d.year <= MAX_YEAR else None
