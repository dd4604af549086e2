"""The patient record: the prefetched FHIR resources, typed where they drive a finding.

Raw JSON is scanned cheaply against the catalog's code indexes first; only resources that can
drive a finding or card context are validated with fhir.resources (R4B models). A resource that
fails validation is skipped and counted, never fatal.
"""
from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from datetime import date, timedelta
from hashlib import blake2b
from operator import attrgetter
from typing import Any, Iterable

import orjson
from pydantic import ValidationError

from ..knowledge.catalog import (ICD10CM, LOINC, Catalog, Ingredient, icd_key, icd_prefix_match, normalize_system, normalize_text,
                      words_regex)
from ..jsonutil import as_list, is_error_outcome
from .sig import parse_sig

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


_WHEN = attrgetter("when")          # sort key: results newest first

_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


# dates a clinical record can hold: anything outside is an entry error and read as no date (adding a supply to a
# date in year 9999 would leave the calendar)
MIN_YEAR, MAX_YEAR = 1800, 2200
# the longest span one record can cover: a days' supply, refills, a planned course (longer is not read)
MAX_COVER_DAYS = 36500
# the most administrations a day and the largest single dose in mg any rule reads; beyond: not a dose
MAX_PER_DAY = 48
MAX_DOSE_MG = 10_000
# text read for matching (names, problem-list entries, sigs) and the longest code: beyond, not read
MAX_TEXT_CHARS = 2000
MAX_LABEL_CHARS = 300
MAX_CODE_CHARS = 64


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


def _short(value: Any) -> Any:
    """Text as read for matching: its first MAX_TEXT_CHARS characters."""
    return value[:MAX_TEXT_CHARS] if type(value) is str and len(value) > MAX_TEXT_CHARS else value


def _code(value: Any) -> Any:
    """A code as read: a string longer than MAX_CODE_CHARS is not a code."""
    return None if type(value) is str and len(value) > MAX_CODE_CHARS else value


def covered_days(days: float | None) -> int | None:
    """A span in days a record states or implies, when a real record could (1 to MAX_COVER_DAYS), else None."""
    if days is None or not math.isfinite(days) or days < 1 or days > MAX_COVER_DAYS:
        return None
    return int(days)


def reference_of(resource: dict) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id', '?')}"


def codings(concept: Any) -> list[dict]:
    if not isinstance(concept, dict):
        return []
    out = concept.get("coding")
    return [c for c in out if isinstance(c, dict)] if isinstance(out, list) else []


def concept_text(concept: Any) -> str:
    """The concept's text and every coding's display, as one string (for matching by name)."""
    if not isinstance(concept, dict):
        return ""
    text = concept.get("text")
    parts = [text] if isinstance(text, str) else []
    cs = concept.get("coding")
    if isinstance(cs, list):
        for c in cs:
            if isinstance(c, dict):
                display = c.get("display")
                if isinstance(display, str) and display not in parts:      # the same words once
                    parts.append(display)
    return " ".join(parts)[:MAX_TEXT_CHARS]


def concept_label(concept: Any) -> str:
    """What a person would call it: the text, else the first display."""
    if not isinstance(concept, dict):
        return ""
    if isinstance(concept.get("text"), str) and concept["text"].strip():
        return _clip(concept["text"].strip())
    return _clip(next((c["display"] for c in codings(concept) if isinstance(c.get("display"), str)), ""))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS - 1].rstrip() + "\u2026"


def status_code(concept: Any) -> str | None:
    for c in codings(concept):
        if isinstance(c.get("code"), str):
            return c["code"]
    return None


def num(x: float) -> str:
    """A number as a card shows it: at most one decimal, no trailing zero ("38.1", "10", "0.5")."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if abs(x) >= 0.05 else f"{x:.2g}"


@dataclass
class MedicationExposure:
    """One medication record read as an exposure: what, how much, from when to when."""

    reference: str
    resource_type: str
    ingredients: list[Ingredient]
    text: str                      # every name the record carries (for matching)
    label: str                     # the one name shown to a clinician
    status: str
    start: date | None
    end: date | None               # last day covered (planned end when in the future)
    ongoing: bool
    systemic: bool
    mg_per_dose: float | None
    doses_per_day: float | None
    daily_mg: float | None
    dose_note: str = ""
    as_needed: bool = False
    single_dose: bool = False      # an injection with no frequency: one dose, however long it stays active
    planned: bool = False          # a draft order being signed: the course it would start
    route_text: str = ""           # dosage, route and form text (where a route rule reads it: local estrogen)
    taper: bool = False            # one step of a tapering sig

    def covers(self, day: date) -> bool:
        return self.start is not None and self.start <= day <= (self.end or self.start)

    def describe(self, as_of: date | None = None, stale_days: int = 400) -> str:
        """The record in words; an order still active but not renewed for `stale_days` reads "last ordered on"
        rather than "ongoing" (Synthea and many EHRs never close an order)."""
        when = self.start.isoformat() if self.start else "date not recorded"
        if as_of and self.ongoing and self.start and not self.single_dose and self.resource_type == "MedicationRequest" \
                and (as_of - self.start).days > stale_days:
            return f"{self.label or 'medication'}{self.regimen()}, last ordered {when} (order still active)"
        if self.single_dose:
            dose = f" {num(self.mg_per_dose)} mg" if self.mg_per_dose else ""
            return f"{self.label or 'medication'}, single{dose} dose on {when}" + \
                (" (order still active)" if self.ongoing else "")
        if self.end and self.end != self.start:
            when += f" to {self.end.isoformat()}" + (" (ongoing/planned)" if self.ongoing else "")
        elif self.ongoing:
            when += " onwards (active)"
        return f"{self.label or 'medication'}{self.regimen()}, {when}"

    def regimen(self) -> str:
        """", 10 mg/day" for daily use; ", 70 mg weekly" (not "10 mg/day") for a weekly or monthly regimen."""
        if not self.daily_mg:
            return ""
        per_day = self.doses_per_day or 1.0
        if per_day >= 0.9 or not self.mg_per_dose:
            return f", {num(self.daily_mg)} mg/day"
        interval = 1 / per_day
        phrase = next((name for days, name in _REGIMENS if abs(interval - days) <= days * 0.1),
                      f"every {interval:.0f} days")
        return f", {num(self.mg_per_dose)} mg {phrase}"


_REGIMENS = ((2, "every other day"), (7, "weekly"), (14, "every 2 weeks"), (30, "monthly"), (91, "every 3 months"),
             (182, "every 6 months"), (365, "yearly"))


class Measurement:
    """One Observation result for one LOINC code. Only `when` is read up front; the value and its
    unit conversion are worked out the first time a rule asks, the reference range, flags and
    coded value only when a rule reads them (most results are never read: rules look at the
    newest few)."""

    __slots__ = ("reference", "code", "when", "_res", "_builder", "_record", "_quantity", "_details")

    def __init__(self, reference: str, code: str, when: date, res: dict, builder: "RecordBuilder",
                 record: "PatientRecord"):
        self.reference = reference
        self.code = code
        self.when = when
        self._res = res
        self._builder = builder
        self._record = record
        self._quantity: tuple | None = None
        self._details: dict | None = None

    def _read_quantity(self) -> tuple:
        """(value, unit, raw value, raw unit, UCUM code, unit text, comparator), the value in the analyte's canonical
        unit. A value reported as a string ("<7.0", ">90", "<0.005 mIU/L") or with a comparator is read as its bound:
        just below it for "<", just above for ">", so a threshold rule reads "<7.0" as below 7 and ">90" as above 90."""
        res = self._res
        q = res.get("valueQuantity")
        comparator = ""
        if isinstance(q, dict):
            raw_value = q.get("value")
            code_unit = q.get("code") if isinstance(q.get("code"), str) else ""
            unit_text = q.get("unit") if isinstance(q.get("unit"), str) else ""
            comparator = q.get("comparator") if q.get("comparator") in _COMPARATORS else ""
        else:
            raw_value, code_unit, unit_text = None, "", ""
            vs = res.get("valueString")
            m = _VALUE_STRING.match(vs[:60].strip()) if isinstance(vs, str) else None
            if m:
                comparator = m.group(1).replace("≤", "<=").replace("≥", ">=")
                raw_value = float(m.group(2))
                unit_text = m.group(3) or _range_unit(res)
                code_unit = unit_text
        builder = self._builder
        value, unit = builder._convert(builder.loinc_to_analyte.get(self.code), raw_value, code_unit, unit_text)
        if unit is _IMPLAUSIBLE:
            unit = ""
            self._record.skipped_implausible += 1       # an entry or transmission error: never evidence
        elif value is not None and comparator in ("<", ">"):
            value *= (1 - 1e-9) if comparator == "<" else (1 + 1e-9)
        self._quantity = (value, unit, raw_value, unit_text or code_unit, code_unit, unit_text, comparator)
        return self._quantity

    def _read_details(self) -> dict:
        if self._details is None:
            res = self._res
            _, _, _, _, code_unit, unit_text, _ = self._quantity or self._read_quantity()
            analyte = self._builder.loinc_to_analyte.get(self.code)
            convert = self._builder._convert
            low = high = None
            for rr in as_list(res.get("referenceRange")):
                if isinstance(rr, dict):
                    low = _number(rr["low"].get("value") if isinstance(rr.get("low"), dict) else None, None)
                    high = _number(rr["high"].get("value") if isinstance(rr.get("high"), dict) else None, None)
                    break
            vc = res.get("valueCodeableConcept")
            self._details = {
                "ref_low": convert(analyte, low, code_unit, unit_text)[0] if low is not None else None,
                "ref_high": convert(analyte, high, code_unit, unit_text)[0] if high is not None else None,
                "interpretation": {c.get("code") for i in as_list(res.get("interpretation"))
                                   for c in codings(i) if c.get("code")},
                "value_codes": codings(vc),
                "value_text": concept_text(vc) or str(res.get("valueString") or ""),
            }
        return self._details

    @property
    def code_text(self) -> str:
        """The result's name as recorded (code text and displays), for rules that read it."""
        return concept_text(self._res.get("code"))

    @property
    def value(self) -> float | None:
        return (self._quantity or self._read_quantity())[0]

    unit = property(lambda self: (self._quantity or self._read_quantity())[1])
    raw_value = property(lambda self: (self._quantity or self._read_quantity())[2])
    comparator = property(lambda self: (self._quantity or self._read_quantity())[6])
    computed_from = None           # a computed result (eGFR): the creatinine it was computed from
    raw_unit = property(lambda self: (self._quantity or self._read_quantity())[3])
    ref_low = property(lambda self: self._read_details()["ref_low"])
    ref_high = property(lambda self: self._read_details()["ref_high"])
    interpretation = property(lambda self: self._read_details()["interpretation"])
    value_codes = property(lambda self: self._read_details()["value_codes"])
    value_text = property(lambda self: self._read_details()["value_text"])


def ckd_epi_2021(creatinine_mg_dl: float, age: int, sex: str) -> float:
    """eGFR (mL/min/1.73 m2) by the race-free CKD-EPI 2021 creatinine equation (Inker, NEJM 2021)."""
    female = sex == "female"
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    ratio = creatinine_mg_dl / kappa
    return 142 * min(ratio, 1) ** alpha * max(ratio, 1) ** -1.200 * 0.9938 ** age * (1.012 if female else 1)


class ComputedEgfr(Measurement):
    """An eGFR the laboratory did not report, computed from that day's creatinine, the patient's age that day and
    sex (CKD-EPI 2021, race-free). It cites the creatinine result it was computed from and says so on the card."""

    def __init__(self, code: str, creatinine: Measurement, value: float):
        self.reference = creatinine.reference
        self.code = code
        self.when = creatinine.when
        self._res = creatinine._res
        self._builder = creatinine._builder
        self._record = creatinine._record
        self._quantity = (value, "mL/min/1.73m2", value, "mL/min/1.73m2", "", "", "")
        self._details = {"ref_low": None, "ref_high": None, "interpretation": set(), "value_codes": [], "value_text": ""}
        self.creatinine = creatinine

    @property
    def computed_from(self) -> str:
        c = self.creatinine
        shown = f"{c.raw_value:g} {c.raw_unit}".strip() if isinstance(c.raw_value, (int, float)) else f"{c.value:.2f} mg/dL"
        return f"computed from creatinine {shown} on {c.when.isoformat()}, CKD-EPI 2021"


@dataclass
class CodedEntry:
    """A Condition or Procedure that matched a catalog code (or, failing that, names a cause or fracture in words)."""

    reference: str
    resource_type: str
    text: str
    when: date | None
    matches: list[tuple[str, str]]        # (cause_id, role)
    codes: list[tuple[str, str]]          # (system, code) of the resource
    historic: bool = False                # resolved or inactive: read only as history (a healed fracture)
    as_text: bool = False                 # matched by its text: no coding the catalog knows
    suspected: bool = False               # provisional, differential, "rule out", "?": never fires a card alone
    category: str = ""                    # problem-list-item, encounter-diagnosis (Conditions)
    sections: tuple[str, ...] = ()        # context code sets it belongs to (pregnancy, end_of_life, ...)
    fracture_site: str | None = None      # hip, vertebra, forearm, humerus, pelvis, unspecified
    high_energy: bool = False             # its own text says the injury was high-energy (a car crash, a fall from height)


@dataclass
class PatientRecord:
    patient_id: str
    as_of: date
    birth_date: date | None = None
    sex: str | None = None
    conditions: list[CodedEntry] = field(default_factory=list)
    procedures: list[CodedEntry] = field(default_factory=list)
    medications: list[MedicationExposure] = field(default_factory=list)
    observations: dict[str, list[Measurement]] = field(default_factory=dict)   # LOINC -> newest first
    skipped_invalid: int = 0
    resources_seen: int = 0          # resource entries read (OperationOutcomes aside)
    has_patient: bool = False
    failed_keys: list[str] = field(default_factory=list)     # prefetch keys whose Bundle carries an error outcome
    raw: dict[str, dict] = field(default_factory=dict)       # "Type/id" -> resource, for lazy validation
    validated: set[str] = field(default_factory=set)
    known_valid: ValidatedResources = field(default_factory=lambda: ValidatedResources(0))
    read_from: dict[str, date] = field(default_factory=dict)   # LOINC -> oldest result kept (rule windows)
    # (system, code) -> newest date of a resolved/inactive/refuted copy of that concept (reconciliation)
    closed_concepts: dict[tuple[str, str], date] = field(default_factory=dict)
    # cause id -> newest date a problem-list entry naming it was closed; causes a problem-list entry refutes
    closed_causes: dict[str, date] = field(default_factory=dict)
    refuted_causes: set[str] = field(default_factory=set)
    superseded: int = 0              # active copies a newer resolved copy of the same concept replaced
    skipped_implausible: int = 0     # results read with a value no real measurement could have
    malformed_dates: int = 0         # resources kept with a malformed date left out (the date is not read)
    deceased: bool = False           # Patient.deceased[x] says so (on or before as_of)
    deceased_on: date | None = None
    transport_accident_dates: set[date] = field(default_factory=set)   # ICD-10-CM V00-V99 conditions (high-energy)

    @cached_property
    def coded_by_cause(self) -> dict[str, list[CodedEntry]]:
        idx: dict[str, list[CodedEntry]] = {}
        for entry in self.conditions + self.procedures:
            for cid in {cid for cid, _ in entry.matches}:
                idx.setdefault(cid, []).append(entry)
        return idx

    @cached_property
    def medications_by_cause(self) -> dict[str, list[MedicationExposure]]:
        idx: dict[str, list[MedicationExposure]] = {}
        for m in self.medications:
            for cid in {i.cause_id for i in m.ingredients}:
                idx.setdefault(cid, []).append(m)
        return idx

    def cause_candidates(self, obs_causes: dict[str, set[str]]) -> set[str]:
        """Causes that something in the record points to: only these need their rules run."""
        cands = set(self.coded_by_cause) | set(self.medications_by_cause)
        for code, lst in self.observations.items():
            if lst:
                cands |= obs_causes.get(code, set())
        return cands

    def _reindex(self) -> None:
        for key in ("coded_by_cause", "medications_by_cause"):
            self.__dict__.pop(key, None)          # cached_property values: rebuilt on next use

    def validate(self, reference: str) -> bool:
        """Type and validate one resource with fhir.resources (R4B); cached per record."""
        if reference in self.validated:
            return True
        res = self.raw.get(reference)
        if res is None:
            return True
        if not self.known_valid.is_valid(res):
            cleaned = without_malformed_dates(res)
            if cleaned is None or not self.known_valid.is_valid(cleaned):
                return False
            self.malformed_dates += 1           # kept: a bad date is one unread field, not a missing resource
        self.validated.add(reference)
        return True

    def without(self, references: set[str]) -> None:
        """Drop resources that failed validation; they are skipped and counted, never fatal."""
        self.skipped_invalid += len(references)
        self.conditions = [c for c in self.conditions if c.reference not in references]
        self.procedures = [p for p in self.procedures if p.reference not in references]
        self.medications = [m for m in self.medications if m.reference not in references]
        for code, lst in list(self.observations.items()):
            self.observations[code] = [m for m in lst if m.reference not in references]
        for ref in references:
            self.raw.pop(ref, None)
        self._reindex()

    @property
    def age(self) -> int | None:
        if not self.birth_date:
            return None
        b, t = self.birth_date, self.as_of
        return t.year - b.year - ((t.month, t.day) < (b.month, b.day))

    def age_on(self, day: date) -> int | None:
        if not self.birth_date:
            return None
        b = self.birth_date
        return day.year - b.year - ((day.month, day.day) < (b.month, b.day))

    @property
    def planned(self) -> list[MedicationExposure]:
        """The draft orders being placed (order-select, order-sign), as read into `medications`."""
        return [m for m in self.medications if m.planned]

    def newest(self, loincs: Iterable[str], since: date | None = None, valued: bool = False) -> Measurement | None:
        """The newest result of these codes on or before `as_of` (and since `since`); with `valued`, the
        newest that has a usable value."""
        return next((m for m in self.results(loincs, since)
                     if m.when <= self.as_of and (not valued or m.value is not None)), None)

    def results(self, loincs: Iterable[str], since: date | None = None) -> list[Measurement]:
        out: list[Measurement] = []
        for code in loincs:
            out += self.observations.get(code, ())
        if since:
            out = [m for m in out if m.when >= since]
        out.sort(key=_WHEN, reverse=True)
        return out


# ---------------------------------------------------------------------------------------------
MEMO_SIZE = 8192

# what reading a malformed resource can raise: it is skipped and counted, never fatal
_MALFORMED = (ValidationError, ValueError, TypeError, KeyError, AttributeError)


class RecordBuilder:
    """Builds a PatientRecord from prefetch resources against one catalog."""

    def __init__(self, catalog: Catalog, known_valid: ValidatedResources | None = None,
                 read_windows: dict[str, int | None] | None = None):
        """`read_windows`: per LOINC code, how many days back the engine reads results (None: any
        age). Older results are left out of the record; without it every result is kept."""
        self.cat = catalog
        self.read_windows = read_windows or {}
        self._cutoffs = lru_cache(maxsize=64)(self._cutoffs_on)
        self._cutoff_days = lru_cache(maxsize=64)(self._cutoff_days_on)
        self.known_valid = known_valid if known_valid is not None else ValidatedResources()
        st = catalog.statuses
        self.cond_clinical = set(st.get("condition_clinical", []))
        self.cond_verif_excluded = set(st.get("condition_verification_excluded", []))
        self.med_excluded = {
            "MedicationRequest": set(st.get("medication_request_excluded", [])),
            "MedicationStatement": set(st.get("medication_statement_excluded", [])),
            "MedicationAdministration": set(st.get("medication_administration_excluded", [])),
            "MedicationDispense": set(st.get("medication_dispense_excluded", [])),
        }
        self.proc_excluded = set(st.get("procedure_excluded", []))
        self.stopped_order_causes = catalog.causes_reading_stopped_orders
        self.obs_counted = set(st.get("observation_counted", []))
        self.loinc_to_analyte: dict[str, str] = {}
        for rule in catalog.observation_rules.values():
            for key, analyte in (("loinc", rule.get("analyte")), ("calcium_loinc", "calcium"),
                                 ("albumin_loinc", "albumin"), ("pth_loinc", "pth"),
                                 ("weight_loinc", "weight"), ("height_loinc", "height"),
                                 ("creatinine_loinc", "creatinine")):
                for code in rule.get(key, []):
                    if analyte:
                        self.loinc_to_analyte.setdefault(code, analyte)
        self.wanted_loincs = set(catalog.loinc_rules) | set(catalog.context_loincs)
        det = catalog.detection
        # codes that shape the card's context (bone diagnoses, DXA procedures, treatment codes)
        self.context_codes: set[str] = set()
        self.context_icd_prefixes: set[str] = set()
        for group in set(det["index_conditions"]) | set(det.get("index_condition_value_sets", {})):
            codes = catalog.index_codes(group)
            self.context_codes.update(c["code"] for c in codes)
            self.context_icd_prefixes.update(icd_key(c["code"]) for c in codes if c.get("match") == "prefix")
        for key in ("procedure_cpt", "procedure_snomed"):
            self.context_codes.update(c["code"] for c in det["existing_dxa"].get(key, []))
        self.context_codes.update(c["code"] for c in det["osteoporosis_treatment"]["other_codes"])
        ms = catalog.medication_settings
        self.timing_codes = {k.upper(): float(v) for k, v in ms.get("timing_codes", {}).items()}
        self.fill_gap_days = (ms.get("fills") or {}).get("gap_allowance_days", 0)
        self.egfr_codes = list(catalog.loinc_groups.get("egfr", []))
        self.creatinine_codes = list(catalog.loinc_groups.get("creatinine", []))
        # Memos of what a code or a name means: the same few thousand fill most charts. Each is
        # bounded (least recently used out); all of them full cost about 15 MB a worker.
        memo = lru_cache(maxsize=MEMO_SIZE)
        self._code_lookup = memo(self._lookup_code)
        self._ingredients_in_text = memo(lambda text: tuple(catalog.ingredients_in_text(text)))
        self._ingredients_coded = memo(lambda system, code: tuple(catalog.ingredients_for_coding(system, code)))
        self._one_coding_ingredients = memo(
            lambda text, display, system, code: tuple(self._ingredients_of(
                [{"system": system, "code": code}], concept_text({"text": text, "coding": [{"display": display}]}))))
        self.procedure_words = [(word, cause.id) for cause in catalog.causes.values()
                                for word in cause.detect.get("procedure_text", ())]
        self._one_coding_matches = memo(
            lambda rt, system, code, text, display: self._concept_matches(
                rt, {"text": text, "coding": [{"system": system, "code": code, "display": display}]}))
        self._condition_text_matches = memo(self._text_matches)
        self._section_text_matches = memo(self._section_matches)
        self._fracture_text_site = memo(self._fracture_text)
        self._fracture_procedure_site = memo(self._fracture_procedure)
        self._text_certainty = memo(self._cue_kinds)
        self._result_name = memo(self._read_result_name)
        self.cond_suspected = set(st.get("condition_verification_suspected", []))
        cues = det.get("condition_text") or {}
        self.cue_kinds_before = {normalize_text(w): kind for kind, ws in cues.get("cues_before", {}).items() for w in ws}
        self.cue_kinds_after = {normalize_text(w): kind for kind, ws in cues.get("cues_after", {}).items() for w in ws}
        energy = det.get("fractures", {}).get("high_energy_words", [])
        self.high_energy_regex = words_regex(energy) if energy else None
        self._procedure_text_matches = memo(
            lambda low: tuple((cause_id, "trigger") for word, cause_id in self.procedure_words if word in low))
        # one reader per resource type, each over all resources of its type
        self._readers = {
            "Patient": self._each(self._patient),
            "Condition": self._each(self._condition),
            "Procedure": self._each(self._procedure),
            "Observation": self._observations,           # most of any chart: a loop of its own
            "MedicationRequest": self._each(self._medication),
            "MedicationStatement": self._each(self._medication),
            "MedicationAdministration": self._each(self._medication),
            "MedicationDispense": self._each(self._medication),      # pharmacy fills: often the best evidence of use
        }

    def build(self, prefetch: dict, patient_id: str, as_of: date, drafts: list[dict] = ()) -> PatientRecord:
        """One pass sorts the prefetch's resources by type; then each type is read in its own loop.
        Medications are gathered in the pass, so a record that points at one finds it wherever
        it was listed. A key whose Bundle carries an error OperationOutcome is noted in
        `failed_keys` (the caller fetches it from the FHIR server instead).

        `drafts`: MedicationRequests being ordered (order-select, order-sign), read as planned
        exposures from their start (today when they name none): `rec.planned`."""
        rec = PatientRecord(patient_id=patient_id, as_of=as_of, known_valid=self.known_valid,
                            read_from=self._cutoffs(as_of))
        batches: dict[str, list[dict]] = {rt: [] for rt in self._readers}
        medications: dict[str, dict] = {}
        others = 0                          # resources of types no rule reads
        for key, value in prefetch.items():
            if type(value) is not dict:
                continue
            if value.get("resourceType") == "Bundle":
                entries = value.get("entry")
                if type(entries) is not list:
                    continue
            else:
                entries = ({"resource": value},)
            for entry in entries:
                res = entry.get("resource") if type(entry) is dict else None
                if type(res) is not dict:
                    continue
                rt = res.get("resourceType")
                if type(rt) is not str:
                    continue                # not a FHIR resource at all
                batch = batches.get(rt)
                if batch is not None:
                    batch.append(res)
                elif rt == "OperationOutcome":
                    if key not in rec.failed_keys and is_error_outcome(res):
                        rec.failed_keys.append(key)
                else:
                    others += 1
                    if rt == "Medication" and type(res.get("id")) is str:
                        medications["Medication/" + res["id"]] = res    # for the records that point at it
        for rt, read in self._readers.items():
            if batches[rt]:
                read(rec, batches[rt], medications)
        for res in drafts:
            try:
                self._medication(rec, res, medications, planned=True)
            except _MALFORMED:
                rec.skipped_invalid += 1
        if rec.closed_concepts or rec.closed_causes or rec.refuted_causes:
            _reconcile(rec)
        if self.fill_gap_days:
            _bridge_fills(rec, self.fill_gap_days)
        rec.resources_seen = others + sum(map(len, batches.values()))
        for lst in rec.observations.values():
            lst.sort(key=_WHEN, reverse=True)
        if self.egfr_codes and self.creatinine_codes and any(rec.observations.get(c) for c in self.creatinine_codes):
            _computed_egfr(rec, self.egfr_codes, self.creatinine_codes)
        return rec

    @staticmethod
    def _each(handler):
        """A reader that hands each resource to `handler`; a malformed one is skipped and counted."""
        def read(rec: PatientRecord, resources: list[dict], medications: dict[str, dict]) -> None:
            for res in resources:
                try:
                    handler(rec, res, medications)
                except _MALFORMED:
                    rec.skipped_invalid += 1
        return read

    # ---- validation ------------------------------------------------------------------------
    @staticmethod
    def _keep(rec: PatientRecord, res: dict) -> str | None:
        """Remember a resource that can drive a finding; it is validated only if it does. None when
        it is kept already: the same resource listed under two prefetch keys counts once."""
        ref = reference_of(res)
        if ref in rec.raw and type(res.get("id")) is str:
            return None
        rec.raw[ref] = res
        return ref

    # ---- Patient -----------------------------------------------------------------------------
    def _patient(self, rec: PatientRecord, res: dict, _medications: dict) -> None:
        patient_id = rec.patient_id
        if rec.has_patient or (patient_id and res.get("id") not in (None, patient_id)):
            return
        ref = self._keep(rec, res)
        if ref is None:
            return                      # the same Patient again, found invalid the first time
        if not rec.validate(ref):
            rec.skipped_invalid += 1
            return
        rec.has_patient = True
        birth = res.get("birthDate")
        rec.birth_date = None if birth is None or _malformed_date(birth) else parse_date(birth)
        g = res.get("gender")
        rec.sex = g if g in ("male", "female") else None
        if res.get("deceasedBoolean") is True:
            rec.deceased = True
        elif isinstance(res.get("deceasedDateTime"), str):
            died = parse_date(res["deceasedDateTime"])
            if died is not None and died <= rec.as_of:     # a death recorded after "today" is not yet so
                rec.deceased, rec.deceased_on = True, died

    # ---- Conditions / Procedures ----------------------------------------------------------------
    def _condition_counts(self, res: dict) -> tuple[str, date | None]:
        """("counts" | "closed" | "ignored", onset or recorded date). "closed": the record says the
        condition is over (resolved, inactive, remission, abated) or refuted; entered-in-error says
        nothing about the patient and is ignored."""
        when = parse_date(res.get("onsetDateTime")) or parse_date((res.get("onsetPeriod") or {}).get("start")) \
            or parse_date(res.get("recordedDate"))
        verification = status_code(res.get("verificationStatus"))
        if verification in self.cond_verif_excluded:
            return ("ignored" if verification == "entered-in-error" else "closed"), when
        clinical = status_code(res.get("clinicalStatus"))
        if clinical is None:
            # encounter diagnoses may carry no clinical status: count them unless abated
            if any(k.startswith("abatement") for k in res):
                return "closed", when
        elif clinical not in self.cond_clinical:
            return "closed", when
        return "counts", when

    def _procedure_counts(self, res: dict) -> tuple[str, date | None]:
        if res.get("status") in self.proc_excluded:
            return "ignored", None
        when = parse_date(res.get("performedDateTime")) or parse_date((res.get("performedPeriod") or {}).get("start"))
        return "counts", when

    def _condition(self, rec: PatientRecord, res: dict, _medications: dict) -> None:
        self._coded(rec, res, rec.conditions, self._condition_counts)

    def _procedure(self, rec: PatientRecord, res: dict, _medications: dict) -> None:
        self._coded(rec, res, rec.procedures, self._procedure_counts)

    def _coded(self, rec: PatientRecord, res: dict, target: list, counts) -> None:
        rt = res["resourceType"]
        concept = res.get("code")
        cs = concept.get("coding") if isinstance(concept, dict) else None
        if isinstance(cs, list) and len(cs) == 1 and isinstance(cs[0], dict):     # the usual entry: one code
            c = cs[0]
            matches, context, codes = self._one_coding_matches(rt, _short(c.get("system")), _code(c.get("code")),
                                                               _short(concept.get("text")), _short(c.get("display")))
        else:
            matches, context, codes = self._concept_matches(rt, concept)
        if rt == "Condition" and codes and any(s == ICD10CM and _TRANSPORT_ACCIDENT.match(c) for s, c in codes):
            state, when = counts(res)
            if when is not None:
                rec.transport_accident_dates.add(when)     # a high-energy injury on that day
        as_text = False
        sections: tuple[str, ...] = ()
        site = None
        if context:
            sections = self._sections_of(codes)
            site = self._site_of(codes)
        if not matches and not context:
            text = concept_text(concept)
            if not text:
                return
            if rt == "Condition":
                if self.cat.condition_text_regex is not None:
                    matches = self._condition_text_matches(text)
                sections = self._section_text_matches(text)
                site = self._fracture_text_site(text)
            else:
                site = self._fracture_procedure_site(text)
            if not matches and not sections and site is None:
                return
            as_text = True
        state, when = counts(res)
        historic = False
        if state == "closed":
            for key in codes:                   # a newer closed copy of the concept supersedes older active ones
                if when is not None and when > rec.closed_concepts.get(key, date.min):
                    rec.closed_concepts[key] = when
            if rt == "Condition" and matches and not _is_encounter_diagnosis(res):
                refuted = status_code(res.get("verificationStatus")) == "refuted"
                for cause_id, _role in matches:  # the problem list outranks encounter diagnoses of the cause
                    if refuted:
                        rec.refuted_causes.add(cause_id)
                    if when is not None and when > rec.closed_causes.get(cause_id, date.min):
                        rec.closed_causes[cause_id] = when
            if site is None:
                return
            historic = True                     # a healed fracture is still a fracture on record
            matches = ()
        elif state != "counts":
            return
        suspected = False
        if rt == "Condition":
            certainty = self._certainty(res, concept, as_text)
            if certainty == "excluded":
                return
            suspected = certainty == "suspected"
        ref = self._keep(rec, res)
        if ref is not None:
            category = ""
            if rt == "Condition":
                category = next((c.get("code") for cat in as_list(res.get("category")) for c in codings(cat)
                                 if isinstance(c.get("code"), str)), "")
            high_energy = site is not None and self._high_energy(concept_text(concept))
            target.append(CodedEntry(ref, rt, concept_label(concept), when, list(matches), list(codes), historic, as_text,
                                     suspected, category, sections, site, high_energy))

    def _certainty(self, res: dict, concept: Any, as_text: bool) -> str:
        """"confirmed", "suspected" (provisional, differential, unconfirmed; "rule out", "?", "suspected" in its text),
        "historic" ("history of ...") or "excluded" (negated, about a relative, not the disease). A coded entry's text
        is read at its start and end only (a name matched in text was already read with its cues)."""
        if status_code(res.get("verificationStatus")) in self.cond_suspected:
            return "suspected"
        if as_text or self.cat.cues_before_regex is None:
            return "confirmed"
        text = concept.get("text") if isinstance(concept, dict) else None
        if not isinstance(text, str) or not text.strip():
            return "confirmed"
        return self._text_certainty(normalize_text(text[:MAX_TEXT_CHARS]))

    def _cue_kinds(self, text: str) -> str:
        """What the cues at the very start ("R/O ...", "FH: ...", "History of ...") or the very end ("... ruled out",
        "...?", "... - resolved") of a coded entry's text say. Only there: a cue word inside a name ("Multiple myeloma
        not having achieved remission", "lactating mother") is part of the name."""
        head = text.lstrip(" -:([*")
        kinds = set()
        m = self.cat.cues_before_regex.match(head)
        if m:
            kinds.add(self.cue_kinds_before.get(m.group(0)))
        tail = text.rstrip(" .)]-*")
        for m in self.cat.cues_after_regex.finditer(tail, max(0, len(tail) - _CUE_WINDOW)):
            kind = self.cue_kinds_after.get(m.group(0))
            if m.end() == len(tail) and kind in ("negated", "uncertain"):
                kinds.add(kind)
        if kinds & {"negated", "other_person", "not_the_disease"}:
            return "excluded"
        if "uncertain" in kinds:
            return "suspected"
        # "History of ..." on a coded entry is the code's own meaning (a history-of situation, a healed fracture)
        return "confirmed"

    def _sections_of(self, codes: tuple) -> tuple[str, ...]:
        return tuple(name for name, cs in self.cat.code_sets.items() if cs.any_of(codes))

    def _site_of(self, codes: tuple) -> str | None:
        site = next((name for name, cs in self.cat.fracture_sites.items() if cs.any_of(codes)), None)
        if site is None and self.cat.osteoporotic_fracture_codes.any_of(codes):
            return "unspecified"                # M80 or Z87.310 without a site the catalog knows
        return site

    def _section_matches(self, text: str) -> tuple[str, ...]:
        low = normalize_text(text[:MAX_TEXT_CHARS])
        return tuple(name for name, rx in self.cat.section_text_regex.items() if self._named_unhedged(rx, low))

    def _fracture_text(self, text: str) -> str | None:
        rx = self.cat.fracture_text_regex
        if rx is None:
            return None
        low = normalize_text(text[:MAX_TEXT_CHARS])
        m = self._named_unhedged(rx, low)
        return self.cat.fracture_text_sites[m.group(0)] if m else None

    def _fracture_procedure(self, text: str) -> str | None:
        rx = self.cat.fracture_procedure_regex
        if rx is None:
            return None
        m = rx.search(normalize_text(text[:MAX_TEXT_CHARS]))
        return self.cat.fracture_procedure_sites[m.group(0)] if m else None

    def _named_unhedged(self, rx: re.Pattern, low: str):
        """The first name `rx` finds in `low` with no negation, hedge, past or other-person cue around it."""
        cat = self.cat
        for m in rx.finditer(low):
            if _negated_prefix(low, m.start()):
                continue
            if cat.cues_before_regex is not None and (cat.cues_before_regex.search(low, max(0, m.start() - _CUE_WINDOW),
                                                                                 m.start())
                                                      or cat.cues_after_regex.search(low, m.end(), m.end() + _CUE_WINDOW)):
                continue
            return m
        return None

    def _high_energy(self, text: str) -> bool:
        return self.high_energy_regex is not None and self.high_energy_regex.search(
            normalize_text(text[:MAX_TEXT_CHARS])) is not None

    def _concept_matches(self, rt: str, concept: Any) -> tuple[tuple, bool, tuple]:
        """(cause matches, whether it shapes the card's context, its (system, code) pairs)."""
        matches: list[tuple[str, str]] = []
        codes: list[tuple[str, str]] = []
        context = False
        for c in codings(concept):
            code = c.get("code")
            if type(code) is str and len(code) <= MAX_CODE_CHARS:      # longer is not a code
                system = normalize_system(_short(c.get("system")))
                codes.append((system, code))
                hits, in_context = self._code_lookup(system, code)
                matches += hits
                context = context or in_context
        if rt == "Procedure" and self.procedure_words:
            matches += self._procedure_text_matches(concept_text(concept).lower())
        return tuple(matches), context, tuple(codes)

    def _text_matches(self, text: str) -> tuple[tuple[str, str], ...]:
        """Causes a Condition's text names, where no cue before or after the name negates it, hedges it,
        puts it in the past or gives it to someone else ("no celiac disease", "FH: rheumatoid arthritis",
        "?Cushing's", "Graves disease - resolved")."""
        cat = self.cat
        low = normalize_text(text[:MAX_TEXT_CHARS])
        out: list[tuple[str, str]] = []
        for m in cat.condition_text_regex.finditer(low):
            if cat.cues_before_regex.search(low, max(0, m.start() - _CUE_WINDOW), m.start()) \
                    or cat.cues_after_regex.search(low, m.end(), m.end() + _CUE_WINDOW) or _negated_prefix(low, m.start()):
                continue
            out += [(cause_id, "trigger") for cause_id in cat.condition_text_causes[m.group(0)]]
        return tuple(dict.fromkeys(out))

    def _lookup_code(self, system: str, code: str) -> tuple[tuple[tuple[str, str], ...], bool]:
        """(causes the code triggers or supports, whether it shapes the card's context). Memoized:
        the same few thousand codes fill most charts."""
        in_context = code in self.context_codes or (system == ICD10CM and icd_prefix_match(code, self.context_icd_prefixes)) \
            or any(cs.holds(system, code) for cs in self.cat.code_sets.values()) \
            or any(cs.holds(system, code) for cs in self.cat.fracture_sites.values())
        return tuple(self.cat.causes_for_code(system, code)), in_context

    # ---- Observations ---------------------------------------------------------------------------
    def _observations(self, rec: PatientRecord, resources: list[dict], _medications: dict) -> None:
        """Results are most of any chart: the cheap rejections come first, one coding is the usual
        case, and a full date before every window that reads the code is not even parsed."""
        counted = self.obs_counted
        wanted_loincs = self.wanted_loincs
        read_from = rec.read_from
        read_from_day = self._cutoff_days(rec.as_of)
        observations = rec.observations
        for res in resources:
            try:
                if res.get("status") not in counted:
                    continue
                concept = res.get("code")
                cs = concept.get("coding") if type(concept) is dict else None
                if type(cs) is not list:
                    continue
                if len(cs) == 1:
                    c = cs[0]
                    if type(c) is not dict or c.get("code") not in wanted_loincs \
                            or (c.get("system") != LOINC and normalize_system(c.get("system")) != LOINC):
                        wanted = self._by_name(concept)
                        if not wanted:
                            continue
                    else:
                        wanted = [c["code"]]
                else:
                    wanted = [c["code"] for c in cs if type(c) is dict and c.get("code") in wanted_loincs
                              and (c.get("system") == LOINC or normalize_system(c.get("system")) == LOINC)]
                    if not wanted:
                        wanted = self._by_name(concept)
                        if not wanted:
                            continue
                effective = res.get("effectiveDateTime")
                if len(wanted) == 1 and type(effective) is str and len(effective) >= 10 \
                        and effective[:10] < read_from_day.get(wanted[0], ""):
                    continue
                when = parse_date(effective)
                if when is None:
                    period = res.get("effectivePeriod")
                    when = parse_date(period.get("start") if type(period) is dict else None) \
                        or parse_date(res.get("effectiveInstant")) or parse_date(res.get("issued"))
                    if when is None:
                        continue
                if len(wanted) == 1:
                    cutoff = read_from.get(wanted[0])
                    if cutoff is not None and when < cutoff:
                        continue                   # older than any rule looks back
                else:
                    wanted = [code for code in wanted if code not in read_from or when >= read_from[code]]
                    if not wanted:
                        continue
                ref = self._keep(rec, res)
                if ref is None:
                    continue
                for code in wanted:
                    m = Measurement(ref, code, when, res, self, rec)
                    if code in observations:
                        observations[code].append(m)
                    else:
                        observations[code] = [m]
            except _MALFORMED:
                rec.skipped_invalid += 1

    def _by_name(self, concept: dict) -> list[str]:
        """A result with no LOINC code the rules read: the LOINC written in its text, or its analyte by name (the
        group's first code), or nothing."""
        text = concept_text(concept)
        return list(self._result_name(text)) if text else []

    def _read_result_name(self, text: str) -> tuple[str, ...]:
        low = normalize_text(text[:MAX_TEXT_CHARS])
        for m in _LOINC_IN_TEXT.finditer(low):
            if m.group(1) in self.wanted_loincs:
                return (m.group(1),)
        rx = self.cat.analyte_name_regex
        if rx is None:
            return ()
        for m in rx.finditer(low):
            analyte = self.cat.analyte_by_name[m.group(0)]
            exclude = self.cat.analyte_exclude_regex.get(analyte)
            if exclude is not None and exclude.search(low):
                continue
            group = self.cat.observation_names[analyte]["group"]
            codes = self.cat.loinc_groups.get(group)
            return (codes[0],) if codes else ()
        return ()

    def _cutoffs_on(self, as_of: date) -> dict[str, date]:
        """The oldest result date worth keeping, per code with a read window."""
        return {code: as_of - timedelta(days=days) for code, days in self.read_windows.items() if days is not None}

    def _cutoff_days_on(self, as_of: date) -> dict[str, str]:
        """The same cut-off dates as ISO strings, compared with a result's full date as written."""
        return {code: day.isoformat() for code, day in self._cutoffs(as_of).items()}

    def _convert(self, analyte: str | None, value: Any, code: str, unit: str) -> tuple[float | None, str]:
        if type(value) is str and _DECIMAL_RE.fullmatch(value):
            value = float(value)                # a decimal sent as a JSON string (seen in EHR and generator output)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return None, ""
        if analyte is None:
            return float(value), code or unit
        spec = self.cat.units[analyte]
        factors = spec["factors"]
        for u in (code, unit):
            if not u:
                continue
            factor = factors.get(u)
            if factor is None:
                factor = {k.lower(): v for k, v in factors.items()}.get(u.lower())
            if factor is not None:
                return _plausible(float(value) * factor, spec)
        if not code and not unit and spec.get("assume_when_missing"):
            return _plausible(float(value), spec)
        return None, ""        # unknown unit: never guess

    # ---- Medications ----------------------------------------------------------------------------
    def _medication(self, rec: PatientRecord, res: dict, medications: dict[str, dict], planned: bool = False) -> None:
        """Read one medication record as an exposure, when it names a cause and counts.
        `planned`: a draft order being signed, read as the course it would start."""
        rt = res["resourceType"]
        concept = res.get("medicationCodeableConcept")
        med_res = None
        mref = res.get("medicationReference")
        if not isinstance(mref, dict):
            # the usual record: a coded concept and no Medication resource; most name no cause
            cs = concept.get("coding") if isinstance(concept, dict) else None
            if isinstance(cs, list) and len(cs) == 1 and isinstance(cs[0], dict):
                c = cs[0]
                ingredients = self._one_coding_ingredients(_short(concept.get("text")), _short(c.get("display")),
                                                           _short(c.get("system")), _code(c.get("code")))
            else:
                ingredients = self._ingredients_of(codings(concept), concept_text(concept))
            if not ingredients:
                return
            text = concept_text(concept)
        else:
            ref = mref.get("reference")
            if isinstance(ref, str):
                if ref.startswith("#"):
                    for c in as_list(res.get("contained")):
                        if isinstance(c, dict) and c.get("resourceType") == "Medication" and c.get("id") == ref[1:]:
                            med_res = c
                else:
                    med_res = medications.get(ref) or medications.get(ref.split("/_history")[0])
                if med_res is not None:
                    concept = med_res.get("code")
            all_codings = codings(concept)
            if med_res is not None:
                for ing in as_list(med_res.get("ingredient")):
                    if isinstance(ing, dict):
                        all_codings += codings(ing.get("itemCodeableConcept"))
            text = concept_text(concept) or (mref.get("display") or "")
            ingredients = self._ingredients_of(all_codings, text)
            if not ingredients:
                return
        status = res.get("status") if isinstance(res.get("status"), str) else ""
        if res.get("doNotPerform") is True:
            return
        if status in self.med_excluded[rt] and not (planned and status == "draft"):
            # a stopped order still shows that a dose was given, for the causes whose rule reads it
            # (and an osteoporosis medicine's stopped order is part of its treatment history)
            if status != "stopped" or not any(i.cause_id in self.stopped_order_causes
                                              or i.cause_id == "osteoporosis_treatment" for i in ingredients):
                return
        ref = self._keep(rec, res)
        if ref is None:
            return
        if planned:
            # an order being placed is checked on what is read from it: an EHR's draft with, say, a
            # malformed `category` (the CDS Hooks sandbox sends an object) still gets its card
            rec.raw[ref] = {k: v for k, v in res.items() if k in _DRAFT_ELEMENTS_READ}
        # de-duplicate: one exposure per (cause, ingredient)
        uniq: dict[tuple[str, str], Ingredient] = {}
        for i in ingredients:
            uniq.setdefault((i.cause_id, i.name), i)
        dosages = res.get("dosageInstruction") if rt in ("MedicationRequest", "MedicationDispense") else res.get("dosage")
        if rt == "MedicationAdministration":
            dosages = [res["dosage"]] if isinstance(res.get("dosage"), dict) else []
        dosages = [d for d in as_list(dosages) if isinstance(d, dict)]
        dosage_text = " ".join(d[k] for d in dosages for k in ("text", "patientInstruction")
                               if isinstance(d.get(k), str))[:MAX_TEXT_CHARS]
        route_text = " ".join(concept_text(d.get("route")) for d in dosages)
        form_text = concept_text((med_res or {}).get("form"))
        full_text = " ".join([text, dosage_text, route_text, form_text]).lower()
        systemic = not self.cat.non_systemic_regex.search(full_text)
        mg_per_dose, per_day, note, as_needed = self._dose(dosages, text, dosage_text, rt)
        sig = None
        if mg_per_dose is None and dosage_text and not self._structured_dose(dosages, rt):
            sig = parse_sig(dosage_text, _strength_mg(text), self.cat.frequency_patterns, _concentration_mg_per_ml(text))
            if sig is not None:
                as_needed = as_needed or sig.as_needed
                mg_per_dose = sig.steps[0].mg_per_dose
                per_day = sig.steps[0].per_day or per_day
        start, end, ongoing = self._interval(res, rt, dosages, rec.as_of, planned)
        supply = None
        if start is not None and end == start and not ongoing and not as_needed:
            supply = covered_days(self._supply_days(res, rt, dosages, mg_per_dose, per_day, text, sig))
        if planned and start is not None and end == start and not as_needed:
            end = start + timedelta(days=(supply or covered_days(self._planned_days(
                res, dosages, dosage_text, mg_per_dose, per_day, text)) or 1) - 1)
        elif supply:
            end = start + timedelta(days=supply - 1)      # the days an order's quantity, or a fill, covers
        if as_needed and rt == "MedicationRequest" and start is not None:
            # an as-needed order counts only what was dispensed: its quantity (and refills) at most one dose a day
            prn = covered_days(self._supply_days(res, rt, dosages, mg_per_dose, per_day or 1.0, text, sig))
            if prn and (end is None or start + timedelta(days=prn - 1) < end):
                end, ongoing = start + timedelta(days=prn - 1), False
        if rt == "MedicationDispense" and mg_per_dose is None and start is not None:
            mg_per_dose, per_day, note = self._dose_from_fill(res, text, end, start)
        single = self._single_dose(res, rt, dosages, dosage_text, full_text) and not as_needed
        if single and start is not None:
            end = start                        # one dose covers its own day
            if note == "frequency not recorded, once daily assumed":
                per_day, note = 1.0, "single dose"
        if mg_per_dose is not None and not (0 < mg_per_dose <= MAX_DOSE_MG):
            mg_per_dose, note = None, "dose not plausible, not read"        # 1e300 mg: an entry error
            rec.skipped_implausible += 1
        if per_day is not None and not (0 < per_day <= MAX_PER_DAY):
            per_day = None
        if mg_per_dose is not None and per_day is None and rt != "MedicationAdministration" and not as_needed:
            per_day, note = 1.0, note or "frequency not recorded, once daily assumed"
        if as_needed:
            per_day, note = None, "as-needed dosing: daily dose not computed"
        if mg_per_dose is None and not note and rt != "MedicationAdministration":
            note = "dose not recorded"
        base = dict(reference=ref, resource_type=rt, ingredients=list(uniq.values()), text=text.strip(),
                    label=concept_label(concept) or text.strip(), status=status, ongoing=ongoing, systemic=systemic,
                    as_needed=as_needed, single_dose=single, planned=planned,
                    route_text=" ".join([dosage_text, route_text, form_text]).strip())
        if sig is not None and sig.taper and not as_needed and start is not None:
            rec.medications += _taper_exposures(base, sig, start, end, per_day, ongoing)
            return
        daily = mg_per_dose * per_day if (mg_per_dose is not None and per_day is not None) else None
        rec.medications.append(MedicationExposure(start=start, end=end, mg_per_dose=mg_per_dose, doses_per_day=per_day,
                                                  daily_mg=daily, dose_note=note, **base))

    @staticmethod
    def _structured_dose(dosages: list[dict], rt: str) -> bool:
        """Whether the record states a dose in structured form (then its text is not read for one)."""
        for d in dosages:
            if rt == "MedicationAdministration" and isinstance(d.get("dose"), dict):
                return True
            if any(isinstance(dr, dict) and (isinstance(dr.get("doseQuantity"), dict) or isinstance(dr.get("doseRange"), dict))
                   for dr in as_list(d.get("doseAndRate"))):
                return True
        return False

    def _supply_days(self, res: dict, rt: str, dosages: list[dict], mg_per_dose: float | None, per_day: float | None,
                     med_text: str, sig) -> int | None:
        """The days a record covers when it states no period: a fill's days' supply; an order's quantity over the
        daily use, times one plus its refills; a sig's stated duration."""
        if rt == "MedicationDispense":
            ds = res.get("daysSupply")
            days = _duration_days(ds) if isinstance(ds, dict) else None
            if days:
                return days
        if rt not in ("MedicationRequest", "MedicationDispense"):
            return None
        if rt == "MedicationRequest":
            dr = res.get("dispenseRequest") if isinstance(res.get("dispenseRequest"), dict) else {}
            qty = dr.get("quantity") if isinstance(dr.get("quantity"), dict) else {}
            refills = _repeats(dr)
        else:
            qty = res.get("quantity") if isinstance(res.get("quantity"), dict) else {}
            refills = 0
        value = _number(qty.get("value"), None)
        if value and value > 0 and per_day:
            unit = str(qty.get("code") or qty.get("unit") or "").lower()
            per_dose = None
            if unit in ("mg", "milligram", "milligrams"):
                per_dose = mg_per_dose
            elif unit in ("ml", "milliliter", "milliliters") and mg_per_dose and _concentration_mg_per_ml(med_text):
                per_dose = mg_per_dose / _concentration_mg_per_ml(med_text)
            elif unit == "" or _TABLET_UNIT.search(unit):
                strength = _strength_mg(med_text)
                per_dose = _dose_units(dosages) or (mg_per_dose / strength if mg_per_dose and strength else None)
            if per_dose:
                days = value / (per_dose * per_day)
                if 1 <= days <= 3650:
                    return round(days) * (1 + refills)
        if sig is not None and all(s.days for s in sig.steps):
            return sum(s.days for s in sig.steps)
        return None

    @staticmethod
    def _dose_from_fill(res: dict, med_text: str, end: date | None, start: date) -> tuple:
        """A fill with no sig: the average daily dose is its quantity x strength over its days' supply."""
        strength = _strength_mg(med_text)
        qty = res.get("quantity") if isinstance(res.get("quantity"), dict) else {}
        value = _number(qty.get("value"), None)
        days = (end - start).days + 1 if end else None
        unit = str(qty.get("code") or qty.get("unit") or "").lower()
        if strength and value and days and (unit == "" or _TABLET_UNIT.search(unit)):
            return value * strength / days, 1.0, "average daily dose from the fill (quantity x strength / days' supply)"
        return None, None, "dose not recorded"

    def _ingredients_of(self, all_codings: list[dict], text: str) -> list[Ingredient] | tuple[Ingredient, ...]:
        """What a medication names: by code, else by name in its text."""
        ingredients: list[Ingredient] = []
        for c in all_codings:
            ingredients += self._ingredients_coded(c.get("system"), c.get("code"))
        return ingredients or self._ingredients_in_text(text)

    def _interval(self, res: dict, rt: str, dosages: list[dict], as_of: date,
                  planned: bool = False) -> tuple[date | None, date | None, bool]:
        """First and last day the record covers; `ongoing` when its status says it is current. A
        planned (draft) order that names no start starts today."""
        status = res.get("status")
        start = end = None
        bounds_days = None
        for d in dosages:
            timing = d.get("timing") if isinstance(d.get("timing"), dict) else {}
            rep = timing.get("repeat") if isinstance(timing.get("repeat"), dict) else {}
            bp = rep.get("boundsPeriod") if isinstance(rep.get("boundsPeriod"), dict) else None
            if bp:
                start = start or parse_date(bp.get("start"))
                end = max(filter(None, [end, parse_date(bp.get("end"))]), default=None)
            if isinstance(rep.get("boundsDuration"), dict):
                bounds_days = max(filter(None, [bounds_days, _duration_days(rep["boundsDuration"])]), default=None)
        if rt == "MedicationRequest":
            dr = res.get("dispenseRequest") if isinstance(res.get("dispenseRequest"), dict) else {}
            vp = dr.get("validityPeriod") if isinstance(dr.get("validityPeriod"), dict) else {}
            start = start or parse_date(vp.get("start")) or parse_date(res.get("authoredOn"))
            if planned:
                start = max(start or as_of, as_of)          # a draft's course starts when it is signed
                if vp.get("end") and not dr.get("expectedSupplyDuration"):
                    end = max(filter(None, [end, parse_date(vp.get("end"))]), default=None)
            supply = _duration_days(dr["expectedSupplyDuration"]) if isinstance(dr.get("expectedSupplyDuration"), dict) else None
            covered = covered_days(supply * (1 + _repeats(dr))) if supply else None
            if covered and start:
                end = max(filter(None, [end, start + timedelta(days=covered - 1)]), default=None)
            ongoing = status in ("active", "on-hold", "unknown", None)
        elif rt == "MedicationStatement":
            ep = res.get("effectivePeriod") if isinstance(res.get("effectivePeriod"), dict) else {}
            start = parse_date(ep.get("start")) or parse_date(res.get("effectiveDateTime")) or start \
                or parse_date(res.get("dateAsserted"))
            end = parse_date(ep.get("end")) or end
            ongoing = status in ("active", "intended", "on-hold", "unknown", None) and (end is None or end >= as_of)
        elif rt == "MedicationDispense":                  # a fill: from the day it was handed over
            start = parse_date(res.get("whenHandedOver")) or parse_date(res.get("whenPrepared"))
            end = start
            ongoing = False
        else:  # MedicationAdministration: a single administration (or an infusion period)
            ep = res.get("effectivePeriod") if isinstance(res.get("effectivePeriod"), dict) else {}
            start = parse_date(res.get("effectiveDateTime")) or parse_date(ep.get("start"))
            end = parse_date(ep.get("end")) or start
            ongoing = status == "in-progress"
        if start is None:
            return None, None, ongoing
        if bounds_days:
            end = max(filter(None, [end, start + timedelta(days=bounds_days - 1)]), default=None)
        if ongoing:
            end = max(end or as_of, as_of)
        if end is None or end < start:
            end = start
        return start, end, ongoing

    def _dose(self, dosages: list[dict], med_text: str, dosage_text: str, rt: str) -> tuple[float | None, float | None, str, bool]:
        """(mg per administration, administrations per day, note, as_needed) from structured dosage or text."""
        strength = _strength_mg(med_text)
        mg = per_day = None
        note = ""
        as_needed = False
        for d in dosages:
            if d.get("asNeededBoolean") is True or isinstance(d.get("asNeededCodeableConcept"), dict):
                as_needed = True
            dose = None
            if rt == "MedicationAdministration":
                dose = d.get("dose") if isinstance(d.get("dose"), dict) else None
            else:
                for dr in as_list(d.get("doseAndRate")):
                    if isinstance(dr, dict):
                        if isinstance(dr.get("doseQuantity"), dict):
                            dose = dr["doseQuantity"]
                        elif isinstance(dr.get("doseRange"), dict) and isinstance(dr["doseRange"].get("low"), dict):
                            dose = dr["doseRange"]["low"]
                        break
            if dose and isinstance(dose.get("value"), (int, float)) and not isinstance(dose.get("value"), bool):
                unit = (dose.get("code") or dose.get("unit") or "").lower()
                value = float(dose["value"])
                if unit in ("mg", "milligram", "milligrams"):
                    mg = value
                elif unit in ("g", "gram", "grams"):
                    mg = value * 1000
                elif unit in ("ug", "mcg", "microgram", "micrograms"):
                    mg = value / 1000
                elif unit in ("ml", "milliliter") and _concentration_mg_per_ml(med_text):
                    mg = value * _concentration_mg_per_ml(med_text)
                elif strength is not None and (unit == "" or _TABLET_UNIT.search(unit)):
                    mg = value * strength
            f = self._frequency(d)
            if f is not None:
                per_day = f
            if mg is not None:
                break
        if per_day is None and dosage_text:
            for pattern, value in self.cat.frequency_patterns:
                if pattern.search(dosage_text):
                    per_day = value
                    break
        if rt == "MedicationAdministration" and mg is not None:
            per_day = 1.0
        return mg, per_day, note, as_needed

    def _planned_days(self, res: dict, dosages: list[dict], dosage_text: str, mg_per_dose: float | None,
                      per_day: float | None, med_text: str) -> int:
        """How many days a draft order would last when it names no supply duration: its quantity
        (tablets, or mg) over the daily use, times one plus its refills; else "for N days/weeks/months"
        in the dosage text; else one day (a course whose length the order does not say)."""
        dr = res.get("dispenseRequest") if isinstance(res.get("dispenseRequest"), dict) else {}
        qty = dr.get("quantity") if isinstance(dr.get("quantity"), dict) else {}
        value = _number(qty.get("value"), None)
        if value and value > 0 and per_day:
            unit = str(qty.get("code") or qty.get("unit") or "").lower()
            strength = _strength_mg(med_text)
            per_dose_units = None
            if unit in ("mg", "milligram", "milligrams"):
                per_dose_units = mg_per_dose
            elif unit == "" or _TABLET_UNIT.search(unit):
                per_dose_units = _dose_units(dosages) or (mg_per_dose / strength if mg_per_dose and strength else None)
            if per_dose_units:
                days = value / (per_dose_units * per_day)
                if 1 <= days <= 3650:
                    return round(days) * (1 + _repeats(dr))
        m = _FOR_DURATION_RE.search(dosage_text or "")
        if m:
            n = float(m.group(1))
            return max(1, round(n * _DURATION_UNIT_DAYS[m.group(2).lower().rstrip("s")]))
        return 1

    def _single_dose(self, res: dict, rt: str, dosages: list[dict], dosage_text: str, full_text: str) -> bool:
        """An injection ordered with no frequency and no planned duration is one dose."""
        if self.cat.single_dose_regex is None or not self.cat.single_dose_regex.search(f" {full_text} "):
            return False
        if rt == "MedicationRequest":
            dr = res.get("dispenseRequest") if isinstance(res.get("dispenseRequest"), dict) else {}
            if dr.get("expectedSupplyDuration") or (dr.get("validityPeriod") or {}).get("end"):
                return False
        elif rt == "MedicationStatement":
            if isinstance(res.get("effectivePeriod"), dict) and res["effectivePeriod"].get("end"):
                return False       # the patient's account of a period of use
        else:
            return False           # an administration is one dose already
        return not self._has_frequency(dosages, dosage_text)

    def _has_frequency(self, dosages: list[dict], dosage_text: str) -> bool:
        """Whether the record says how often it is given (structured timing or dosage text)."""
        if any(self._frequency(d) is not None for d in dosages):
            return True
        for d in dosages:
            timing = d.get("timing") if isinstance(d.get("timing"), dict) else {}
            rep = timing.get("repeat") if isinstance(timing.get("repeat"), dict) else {}
            if rep.get("boundsPeriod") or rep.get("boundsDuration"):
                return True
        return bool(dosage_text) and any(p.search(dosage_text) for p, _ in self.cat.frequency_patterns)

    def _frequency(self, dosage: dict) -> float | None:
        timing = dosage.get("timing") if isinstance(dosage.get("timing"), dict) else None
        if not timing:
            return None
        rep = timing.get("repeat") if isinstance(timing.get("repeat"), dict) else {}
        period, unit = rep.get("period"), rep.get("periodUnit")
        if isinstance(period, (int, float)) and period > 0 and unit in _UNIT_DAYS:
            freq = rep.get("frequency") if isinstance(rep.get("frequency"), int) and rep.get("frequency") > 0 else 1
            days = period * _UNIT_DAYS[unit]
            per_day = freq / days if days > 0 and math.isfinite(days) else math.inf
            return per_day if per_day <= MAX_PER_DAY else None      # 5e-324 s, 1e12 a day: not a frequency
        if isinstance(rep.get("frequency"), int) and 0 < rep["frequency"] <= MAX_PER_DAY and not period:
            return float(rep["frequency"])   # "n times" with no period: per day is the common EHR reading
        for c in codings(timing.get("code")):
            if isinstance(c.get("code"), str) and c["code"].upper() in self.timing_codes:
                return self.timing_codes[c["code"].upper()]
        return None


def _computed_egfr(rec: PatientRecord, egfr_codes: list[str], creatinine_codes: list[str]) -> None:
    """Kidney function from creatinine alone: when the record holds no reported eGFR at all, one eGFR per day with a
    creatinine result, by CKD-EPI 2021 from the age that day and the recorded sex (none when either is unknown)."""
    if any(rec.observations.get(c) for c in egfr_codes) or rec.sex not in ("male", "female"):
        return
    code = "98979-8" if "98979-8" in egfr_codes else egfr_codes[0]
    per_day: dict[date, Measurement] = {}
    for m in rec.results(creatinine_codes):
        if m.value is not None and m.value > 0 and (m.when not in per_day or m.value > per_day[m.when].value):
            per_day[m.when] = m
    out = []
    for day, m in per_day.items():
        age = rec.age_on(day)
        if age is not None and age >= 18:
            out.append(ComputedEgfr(code, m, round(ckd_epi_2021(m.value, age, rec.sex), 1)))
    if out:
        out.sort(key=_WHEN, reverse=True)
        rec.observations[code] = out


def _bridge_fills(rec: PatientRecord, allowance: int) -> None:
    """Fills of one medicine a few days late are one course: the gap up to `allowance` days between one fill's last
    day and the next fill is counted as covered (refills are rarely collected on the day the last one runs out)."""
    by_drug: dict[str, list[MedicationExposure]] = {}
    for m in rec.medications:
        if m.resource_type == "MedicationDispense" and m.start and m.end:
            by_drug.setdefault(m.ingredients[0].name, []).append(m)
    for fills in by_drug.values():
        fills.sort(key=lambda m: m.start)
        for cur, nxt in zip(fills, fills[1:]):
            gap = (nxt.start - cur.end).days - 1
            if 0 < gap <= allowance:
                cur.end = nxt.start - timedelta(days=1)


def _taper_exposures(base: dict, sig, start: date, end: date | None, per_day: float | None,
                     ongoing: bool) -> list[MedicationExposure]:
    """A tapering sig as one exposure per step, back to back from the record's start; the last step runs to the end
    of what the record covers (or for its own stated days)."""
    out = []
    day = start
    last = len(sig.steps) - 1
    for n, step in enumerate(sig.steps):
        f = step.per_day or per_day or 1.0
        if step.days:
            step_end = day + timedelta(days=step.days - 1)
        else:
            step_end = max(end or day, day)
        if n == last and end and end > step_end and not step.days:
            step_end = end
        out.append(MedicationExposure(start=day, end=step_end, mg_per_dose=step.mg_per_dose, doses_per_day=f,
                                      daily_mg=step.mg_per_dose * f, dose_note="taper", taper=True,
                                      **{**base, "ongoing": ongoing and n == last}))
        day = step_end + timedelta(days=1)
    return out


def _reconcile(rec: PatientRecord) -> None:
    """Read the problem list per concept, as a clinician does: when the newest copy of a condition
    (Synthea and many EHRs re-record it at each visit) is resolved or refuted, the older copies
    left active are stale. An active copy as new as the newest closed one stands.
    The problem list outranks encounter diagnoses (billing copies, often without a status): a cause
    the problem list refutes is not revived by an encounter diagnosis of any date, and one it closed
    is not revived by encounter diagnoses up to that date, in whatever code system they are written."""
    closed = rec.closed_concepts
    kept = []
    for c in rec.conditions:
        if not c.historic and c.when is not None and any(closed.get(key, date.min) > c.when for key in c.codes):
            rec.superseded += 1
            continue
        if c.category == ENCOUNTER_DIAGNOSIS and c.matches and all(
                cause in rec.refuted_causes or (c.when is not None and rec.closed_causes.get(cause, date.min) >= c.when)
                for cause, _role in c.matches):
            rec.superseded += 1
            continue
        kept.append(c)
    rec.conditions = kept


ENCOUNTER_DIAGNOSIS = "encounter-diagnosis"


def _is_encounter_diagnosis(res: dict) -> bool:
    return any(c.get("code") == ENCOUNTER_DIAGNOSIS for cat in as_list(res.get("category")) for c in codings(cat))


_IMPLAUSIBLE = "implausible"
_COMPARATORS = ("<", "<=", ">", ">=")
# "<7.0", "> 90", "<0.005 mIU/L", "<=20 ng/mL": a bound and an optional unit (bounded: read in linear time)
_VALUE_STRING = re.compile(r"(<=|>=|<|>|≤|≥)?\s{0,3}(\d{1,9}(?:\.\d{1,9})?)\s{0,3}([A-Za-z%µμ/{}\[\]_.0-9]{1,20})?\s*$")
# a LOINC code written in a result's text ("LOINC 62292-8", "(62292-8)")
_LOINC_IN_TEXT = re.compile(r"(?<![\d-])(\d{1,5}-\d)(?![\d-])")


def _negated_prefix(low: str, start: int) -> bool:
    """"non-cystic fibrosis bronchiectasis": a name with "non-" directly in front of it names something else (while
    "non-Hodgkin lymphoma" is a lymphoma: there the prefix belongs to another word)."""
    return low[max(0, start - 4):start] in ("non-", "non ")


def _range_unit(res: dict) -> str:
    """The unit of a result's reference range (a string value names none of its own)."""
    for rr in as_list(res.get("referenceRange")):
        if isinstance(rr, dict):
            for bound in ("low", "high"):
                q = rr.get(bound)
                if isinstance(q, dict):
                    unit = q.get("code") or q.get("unit")
                    if isinstance(unit, str) and unit:
                        return unit
    return ""


# ICD-10-CM chapter XX transport accidents (V00-V99): the injury that day was high-energy
_TRANSPORT_ACCIDENT = re.compile(r"[Vv]\d\d")
# cues are read within this many characters of a name (a coded entry's text: of its start and end), and text is
# matched on its first MAX_TEXT_CHARS characters: linear time whatever a record carries
_CUE_WINDOW = 40


def _plausible(value: float, spec: dict) -> tuple[float | None, str]:
    """The value in the canonical unit, or (None, _IMPLAUSIBLE) when no real measurement could have it."""
    bounds = spec.get("plausible")
    if bounds and not bounds[0] <= value <= bounds[1]:
        return None, _IMPLAUSIBLE
    return value, spec["canonical"]


_DECIMAL_RE = re.compile(r"-?\d{1,9}(?:\.\d{1,9})?")
_UNIT_DAYS = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1, "wk": 7, "mo": 30, "a": 365}


def _number(value: Any, default: float | None) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _duration_days(q: dict) -> int | None:
    value = q.get("value")
    unit = q.get("code") or q.get("unit")
    if not isinstance(value, (int, float)) or value <= 0:
        return None
    factor = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30, "months": 30,
              "a": 365, "year": 365, "years": 365, "h": 1 / 24}.get(str(unit).lower())
    if factor is None:
        return None
    days = int(round(value * factor))
    return days if 0 < days < 36500 else None


# a number starts only where no digit or point precedes it, and has bounded digits: linear time on any text
_STRENGTH_RE = re.compile(r"(?<![\d.])(\d{1,7}(?:\.\d{1,6})?)\s{0,3}mg\b(?!\s*/)", re.I)
_CONC_RE = re.compile(r"(?<![\d.])(\d{1,7}(?:\.\d{1,6})?)\s{0,3}mg\s{0,3}/\s{0,3}(\d{1,7}(?:\.\d{1,6})?)?\s{0,3}ml\b", re.I)


# a dose or quantity unit that counts tablets, capsules or the like (UCUM annotations and EHR words)
_TABLET_UNIT = re.compile(r"tab|cap|\{tbl\}|\{cap\}|^1$|each|pill")
_DRAFT_ELEMENTS_READ = frozenset({"resourceType", "id", "status", "intent", "subject", "authoredOn", "doNotPerform",
                                  "medicationCodeableConcept", "medicationReference", "contained",
                                  "dosageInstruction", "dispenseRequest"})
_FOR_DURATION_RE = re.compile(r"\bfor\s+(\d{1,3}(?:\.\d)?)\s*(days?|weeks?|months?)\b", re.I)
_DURATION_UNIT_DAYS = {"day": 1, "week": 7, "month": 30}


def _repeats(dispense: dict) -> int:
    """dispenseRequest.numberOfRepeatsAllowed when it is a plausible count, else 0."""
    n = dispense.get("numberOfRepeatsAllowed")
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 100 else 0


def _dose_units(dosages: list[dict]) -> float | None:
    """Tablets (or capsules) per administration, when the dose is given in them."""
    for d in dosages:
        for dr in as_list(d.get("doseAndRate")):
            q = dr.get("doseQuantity") if isinstance(dr, dict) else None
            if isinstance(q, dict):
                unit = str(q.get("code") or q.get("unit") or "").lower()
                value = _number(q.get("value"), None)
                if value and _TABLET_UNIT.search(unit):
                    return value
    return None


def _strength_mg(text: str) -> float | None:
    m = _STRENGTH_RE.search(text or "")
    return float(m.group(1)) if m else None


def _concentration_mg_per_ml(text: str) -> float | None:
    m = _CONC_RE.search(text or "")
    if not m:
        return None
    per = float(m.group(2)) if m.group(2) else 1.0
    return float(m.group(1)) / per if per else None


