"""Medications as exposures: dose, frequency, interval and planned days from structured dosage, free-text sigs,
supply, quantity and refills; pharmacy fills bridged into courses.

Over 400 lines for a reason: dose, frequency, interval and duration decide one another (a dose from a fill needs
the days it covers, the days need the daily use), so they are read together in one reader."""
from __future__ import annotations

import math
import re
from datetime import date, timedelta


from ...knowledge.catalog import Ingredient
from ...jsonutil import as_list
from ..sig import parse_sig
from .validation import parse_date
from .values import _code, _number, _short, codings, concept_label, concept_text, covered_days, MAX_DOSE_MG, MAX_PER_DAY, MAX_TEXT_CHARS, MedicationExposure, PatientRecord


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


_UNIT_DAYS = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1, "wk": 7, "mo": 30, "a": 365}


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


class MedicationReader:
    """Medications: dose, frequency, interval, duration, refills and fills. Mixed into RecordBuilder, whose state it reads."""

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
