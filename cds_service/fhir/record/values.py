"""The patient record and its value types (medication exposures, measurements, coded entries), and the small
readers of FHIR datatypes they share, with the bounds every text, code, date and dose is read within.

Over 400 lines for a reason: it is the record's whole vocabulary (what every rule and card reads), kept in one
place so that a reader of the engine finds every value type here."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from datetime import date
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Iterable


from pydantic import ValidationError

from ...knowledge.catalog import Ingredient
from ...jsonutil import as_list
from .validation import ValidatedResources, without_malformed_dates


if TYPE_CHECKING:
    from .builder import RecordBuilder

_WHEN = attrgetter("when")          # sort key: results newest first

# the longest span one record can cover: a days' supply, refills, a planned course (longer is not read)
MAX_COVER_DAYS = 36500

# the most administrations a day and the largest single dose in mg any rule reads; beyond: not a dose
MAX_PER_DAY = 48
MAX_DOSE_MG = 10_000

# text read for matching (names, problem-list entries, sigs) and the longest code: beyond, not read
MAX_TEXT_CHARS = 2000
MAX_LABEL_CHARS = 300
MAX_CODE_CHARS = 64


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
            try:
                self._record.skipped_implausible += 1   # an entry or transmission error: never evidence
            except ReferenceError:
                pass                                    # read after its record was freed: nothing left to count on
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


_IMPLAUSIBLE = "implausible"
_COMPARATORS = ("<", "<=", ">", ">=")

# "<7.0", "> 90", "<0.005 mIU/L", "<=20 ng/mL": a bound and an optional unit (bounded: read in linear time)
_VALUE_STRING = re.compile(r"(<=|>=|<|>|≤|≥)?\s{0,3}(\d{1,9}(?:\.\d{1,9})?)\s{0,3}([A-Za-z%µμ/{}\[\]_.0-9]{1,20})?\s*$")


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


def _number(value: Any, default: float | None) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

# what reading a malformed resource can raise: it is skipped and counted, never fatal
_MALFORMED = (ValidationError, ValueError, TypeError, KeyError, AttributeError)
