"""Observations read against the catalog: by code or analyte name, values converted to the rule's unit and
checked for plausibility, eGFR computed from creatinine when none is reported."""
from __future__ import annotations

import math
import re
import weakref
from datetime import date, timedelta
from typing import Any


from ...knowledge.catalog import LOINC, normalize_system, normalize_text
from .validation import parse_date
from .values import _IMPLAUSIBLE, _MALFORMED, _WHEN, ckd_epi_2021, ComputedEgfr, concept_text, MAX_TEXT_CHARS, Measurement, PatientRecord


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


# a LOINC code written in a result's text ("LOINC 62292-8", "(62292-8)")
_LOINC_IN_TEXT = re.compile(r"(?<![\d-])(\d{1,5}-\d)(?![\d-])")


def _plausible(value: float, spec: dict) -> tuple[float | None, str]:
    """The value in the canonical unit, or (None, _IMPLAUSIBLE) when no real measurement could have it."""
    bounds = spec.get("plausible")
    if bounds and not bounds[0] <= value <= bounds[1]:
        return None, _IMPLAUSIBLE
    return value, spec["canonical"]


_DECIMAL_RE = re.compile(r"-?\d{1,9}(?:\.\d{1,9})?")


class ObservationReader:
    """Observations: codes or names, values with units and plausibility. Mixed into RecordBuilder, whose state it reads."""

    # ---- Observations ---------------------------------------------------------------------------
    def _observations(self, rec: PatientRecord, resources: list[dict], _medications: dict) -> None:
        """Results are most of any chart: the cheap rejections come first, one coding is the usual
        case, and a full date before every window that reads the code is not even parsed."""
        counted = self.obs_counted
        result_codes = self.result_codes
        read_from = rec.read_from
        read_from_day = self._cutoff_days(rec.as_of)
        observations = rec.observations
        # a Measurement counts an implausible value on its record, through a weak proxy: the record holds its
        # Measurements, and a strong link back would make every record a cycle, freed by the cyclic collector
        # (resources and all) instead of the moment it is done with
        counter = weakref.proxy(rec)
        for res in resources:
            try:
                if res.get("status") not in counted:
                    continue
                wanted = result_codes(res.get("code"))
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
                    m = Measurement(ref, code, when, res, self, counter)
                    if code in observations:
                        observations[code].append(m)
                    else:
                        observations[code] = [m]
            except _MALFORMED:
                rec.skipped_invalid += 1

    def result_codes(self, concept: Any) -> list[str]:
        """The codes the rules read a result under, from its `code` alone: its LOINC codes the rules read, else the
        LOINC written in its text or its analyte by name; [] when no rule reads it. Nothing else about a result can
        make the rules read it, so the screen leaves results with such a code out before they are parsed."""
        cs = concept.get("coding") if type(concept) is dict else None
        if type(cs) is not list:
            return []
        wanted_loincs = self.wanted_loincs
        if len(cs) == 1:                        # the usual case
            c = cs[0]
            if type(c) is dict and c.get("code") in wanted_loincs \
                    and (c.get("system") == LOINC or normalize_system(c.get("system")) == LOINC):
                return [c["code"]]
            return self._by_name(concept)
        wanted = [c["code"] for c in cs if type(c) is dict and c.get("code") in wanted_loincs
                  and (c.get("system") == LOINC or normalize_system(c.get("system")) == LOINC)]
        return wanted or self._by_name(concept)

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
