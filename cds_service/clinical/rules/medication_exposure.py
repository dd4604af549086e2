"""`medication_rule` of a cause: exposure to a drug, read as courses over time. Glucocorticoids by dose and
duration (prednisone-equivalent mg/day, cumulative days at each dose, ACR 2022 tiers), the other drugs by
sustained, current or recent use, with fills, tapers and weekly or monthly regimens said as such."""
from __future__ import annotations

from datetime import date, timedelta

from ...knowledge.catalog import Catalog, Cause
from ...fhir.record import MedicationExposure, PatientRecord, num
from ..assessment import BoneContext, Evidence
from ..rules import result_evidence


class MedicationExposureRule:
    """A cause's medication rule against a record; the catalog's glucocorticoid settings read once."""

    def __init__(self, catalog: Catalog):
        self.cat = catalog
        self.gc = catalog.medication_settings["glucocorticoids"]

    # ---- medications -------------------------------------------------------------------------
    def _exposures(self, cause: Cause, med: dict, rec: PatientRecord) -> list[MedicationExposure]:
        since = rec.as_of - timedelta(days=med.get("lookback_days", 365))
        out = []
        for m in rec.medications_by_cause.get(cause.id, ()):
            last = rec.as_of if m.ongoing else (m.end or m.start)      # an order still active is current, however old
            if m.start is None or last < since or (m.start > rec.as_of + timedelta(days=1) and not m.planned):
                continue                     # a future start is read only for an order being signed now
            if not m.systemic or (m.status == "stopped" and not med.get("counts_stopped_orders")):
                continue
            low = m.text.lower()
            if any(w in low for w in med.get("exclude_text", ())):
                continue
            if med.get("require_text_any") and not any(w in low for w in med["require_text_any"]):
                continue
            out.append(m)
        companions = [m for m in out if not all(i.counts_only_with_other_ingredients
                                                for i in m.ingredients if i.cause_id == cause.id)]
        if not companions:
            return []
        return out

    @staticmethod
    def _current(exps: list[MedicationExposure], rec: PatientRecord) -> list[MedicationExposure]:
        """Exposures still running, or ended within the last 90 days."""
        recent = rec.as_of - timedelta(days=90)
        return [m for m in exps if m.end and m.end >= recent]

    def currently_on(self, cause_id: str, rec: PatientRecord) -> bool:
        cause = self.cat.causes[cause_id]
        return bool(self._current(self._exposures(cause, cause.medication_rule or {}, rec), rec))

    def evaluate(self, cause: Cause, med: dict, rec: PatientRecord,
                         ctx: BoneContext | None = None) -> tuple[list[Evidence], str | None, list[str]]:
        pat = med.get("patient") or {}
        if pat.get("sex") and rec.sex != pat["sex"]:
            return [], None, []
        exps = self._exposures(cause, med, rec)
        if not exps:
            return [], None, []
        ind = med.get("indication")
        if ind and not (ctx is not None and any(ctx.sections.get(s) for s in ind["sections"])):
            # no indication on record: only a course long enough to be that therapy counts
            days = _union_days([(m.start, m.end or m.start) for m in exps])
            if days < ind.get("or_min_days", 36500):
                return [], None, []
        rule = med["rule"]
        lookback = rec.as_of - timedelta(days=med.get("lookback_days", 365))
        if rule == "glucocorticoid_exposure":
            return self._glucocorticoids(exps, rec, lookback)
        if rule == "recent_use":
            # a dose given within the window, or an order still active, however old
            since = rec.as_of - timedelta(days=med["within_days"])
            recent = [m for m in exps if m.start <= rec.as_of and (m.start >= since or m.ongoing)]
            return _grouped(recent, rec.as_of), None, cause.citations[:1]
        if rule == "any_use":
            return _grouped(exps, rec.as_of), None, cause.citations[:1]
        if rule == "current_use_with_lab":
            current = self._current(exps, rec)
            if not current:
                return [], None, []
            lab = result_evidence(self.cat.observation_rules[med["requires_observation"]], rec)
            if not lab:
                return [], None, []
            return _grouped(current, rec.as_of) + lab, None, cause.citations[:1]
        if rule == "high_dose":
            high = [m for m in exps if m.mg_per_dose and m.mg_per_dose >= med["min_single_dose_mg"]]
            return [Evidence(m.reference, m.describe(rec.as_of) + f", {num(m.mg_per_dose)} mg per dose") for m in high], None, cause.citations[:1]
        # sustained_use: days counted from the first day of the window (never more days than the window has)
        lookback = rec.as_of - timedelta(days=med.get("lookback_days", 365) - 1)
        per_record = med.get("days_per_record")
        intervals = []
        for m in exps:
            end = m.end or m.start
            if per_record and end == m.start:
                end = m.start + timedelta(days=per_record - 1)
            # refills planned on record are not use yet; a draft being signed counts its planned course
            intervals.append((max(m.start, lookback), end if m.planned else min(end, rec.as_of)))
        days = _union_days(intervals)
        if days < med.get("min_days", 0):
            return [], None, []
        ev = _grouped(exps, rec.as_of)
        ev.append(Evidence(exps[0].reference, f"{days} days of use in the last {med.get('lookback_days', 365)} days "
                                              f"(threshold {med.get('min_days', 0)} days)"))
        return ev, None, cause.citations[:1]

    def _glucocorticoids(self, exps: list[MedicationExposure], rec: PatientRecord, lookback: date):
        gc = self.gc
        horizon = rec.as_of + timedelta(days=365)
        no_equiv = set(gc.get("no_equivalent", []))
        replacement = gc.get("replacement_dose_max_mg", {})
        dosed: list[tuple[date, date, str, float]] = []        # (start, end, ingredient, mg/day prednisone-eq)
        unknown: list[tuple[date, date]] = []
        budesonide: list[tuple[date, date]] = []
        used: list[tuple[MedicationExposure, str]] = []
        for m in exps:
            ing = next(i for i in m.ingredients if i.cause_id == "glucocorticoids")
            if ing.name in replacement and m.daily_mg is not None and m.daily_mg <= replacement[ing.name]:
                continue              # physiologic replacement, not GIOP-level exposure
            start, end = max(m.start, lookback), min(m.end or m.start, horizon)
            if end < start:
                continue
            if ing.name in no_equiv:
                budesonide.append((start, end))
                used.append((m, f"{m.describe(rec.as_of)}; no accepted prednisone equivalent, counted by duration for review"))
            elif m.daily_mg is None or ing.prednisone_equivalent_factor is None:
                unknown.append((start, end))
                used.append((m, f"{m.describe(rec.as_of)}; dose not recorded" + (f" ({m.dose_note})" if m.dose_note else "")))
            else:
                pe = m.daily_mg * ing.prednisone_equivalent_factor
                dosed.append((start, end, ing.name, pe))
                note = f" ({m.dose_note})" if m.dose_note else ""
                used.append((m, f"{m.describe(rec.as_of)} = {num(pe)} mg/day prednisone-equivalent{note}"))
        segments = _dose_segments(dosed)           # [(start, end, total mg/day)], non-overlapping

        def days_at(mg: float) -> int:
            return sum((e - s).days + 1 for s, e, v in segments if v >= mg)

        ev = []
        grouped: dict[tuple, list[MedicationExposure]] = {}
        for m, text in used:
            if m.resource_type == "MedicationDispense" or m.taper:
                grouped.setdefault((m.label, m.taper), []).append(m)
            else:
                ev.append(Evidence(m.reference, text))
        for (label, taper), ms in grouped.items():
            if taper:
                ev.append(_taper_line(label, ms))
                continue
            pes = [m.daily_mg * next(i for i in m.ingredients if i.cause_id == "glucocorticoids").prednisone_equivalent_factor
                   for m in ms if m.daily_mg is not None and next(i for i in m.ingredients
                                                                  if i.cause_id == "glucocorticoids").prednisone_equivalent_factor]
            extra = "; dose not recorded"
            if pes:
                low, high = num(min(pes)), num(max(pes))
                extra = f"; {low if low == high else f'{low} to {high}'} mg/day prednisone-equivalent"
            ev.append(_fills_line(label, ms, rec.as_of, 365, extra))
        tier = None
        cites = []
        year_ago = rec.as_of - timedelta(days=365)
        cumulative = sum(((min(e, rec.as_of) - max(s, year_ago)).days + 1) * v
                         for s, e, v in segments if s <= rec.as_of and e >= year_ago)
        # a very-high-dose course qualifies on its own (ACR 2022: >= 30 mg/day for > 30 days, or >= 5 g in a
        # year), before it has run three months
        very_high = [t for t in gc["tiers"] if t.get("qualifies_alone")
                     and (days_at(t["min_mg_per_day"]) >= t["min_days"]
                          or (t.get("or_cumulative_mg_per_365_days") and cumulative >= t["or_cumulative_mg_per_365_days"]))]
        if days_at(gc["min_mg_per_day"]) >= gc["min_days"] or very_high:
            for t in gc["tiers"]:
                n = days_at(t["min_mg_per_day"])
                if n >= t["min_days"] or (t.get("or_cumulative_mg_per_365_days") and cumulative >= t["or_cumulative_mg_per_365_days"]):
                    tier = t["id"]
                    cites.append(t["citation"])
                    break
            total = days_at(gc["min_mg_per_day"])
            so_far = sum((min(e, rec.as_of) - s).days + 1 for s, e, v in segments if v >= gc["min_mg_per_day"] and s <= rec.as_of)
            ahead = "the planned course" if any(m.planned for m in exps) else "the supply ordered or filled beyond today"
            planned = f" ({total} including {ahead})" if total > so_far else ""
            ev.append(Evidence(used[0][0].reference,
                               f"{so_far} days so far at >= {gc['min_mg_per_day']:g} mg/day prednisone-equivalent{planned}; "
                               f"cumulative {cumulative:,.0f} mg in the last 365 days",
                               numbers={"days_so_far": so_far, "days_total": total, "cumulative_mg": cumulative,
                                        "peak_mg_per_day": max((v for _, _, v in segments), default=0.0)}))
            cites.insert(0, gc["citation"])
        elif unknown and _union_days(unknown + [(s, e) for s, e, _, _ in dosed]) >= gc["unknown_dose_min_days"]:
            tier = "dose_not_recorded"
            cites.append(gc["unknown_dose_citation"])
            ev.append(Evidence(used[0][0].reference,
                               f"{_union_days(unknown + [(s, e) for s, e, _, _ in dosed])} days of systemic glucocorticoid orders; dose not recorded"))
        elif _union_days(budesonide) >= gc["min_days"]:
            tier = "budesonide_review"
            cites.append(gc["citation"])
        else:
            return [], None, []
        return ev, tier, cites


# ---- helpers ------------------------------------------------------------------------------------
def _dose_segments(dosed: list[tuple[date, date, str, float]]) -> list[tuple[date, date, float]]:
    """Split dosed intervals into non-overlapping segments with the total mg/day on each.

    Two records of the same ingredient on the same day count once (the higher dose): a
    MedicationRequest and a MedicationStatement for one prescription are one exposure.
    """
    if not dosed:
        return []
    cuts = sorted({s for s, _, _, _ in dosed} | {e + timedelta(days=1) for _, e, _, _ in dosed})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        per_ingredient: dict[str, float] = {}
        for s, e, ing, pe in dosed:
            if s <= a and e >= a:
                per_ingredient[ing] = max(per_ingredient.get(ing, 0.0), pe)
        if per_ingredient:
            out.append((a, b - timedelta(days=1), sum(per_ingredient.values())))
    return out


def _grouped(exps: list[MedicationExposure], as_of: date | None = None, window: int = 365) -> list[Evidence]:
    """One line per medicine and regimen: "omeprazole 20 MG ..., 20 mg/day, 24 records 2019-03-02 to 2026-05-01"; fills
    of one medicine as one line; the steps of a taper as one line."""
    groups: dict[tuple, list[MedicationExposure]] = {}
    for m in exps:
        if m.resource_type == "MedicationDispense":
            groups.setdefault((m.label, "fills", False), []).append(m)
        elif m.taper:
            groups.setdefault((m.label, "taper", False), []).append(m)
        else:
            groups.setdefault((m.label, m.regimen(), m.single_dose), []).append(m)
    out = []
    for (label, regimen, _), ms in groups.items():
        if regimen == "fills":
            out.append(_fills_line(label, ms, as_of, window))
            continue
        if regimen == "taper":
            out.append(_taper_line(label, ms))
            continue
        if len(ms) == 1:
            out.append(Evidence(ms[0].reference, ms[0].describe(as_of)))
            continue
        ms.sort(key=lambda m: m.start or date.min)
        first = ms[0].start.isoformat() if ms[0].start else "date not recorded"
        last = max((m.end or m.start) for m in ms if m.start)
        active = " (still active)" if any(m.ongoing for m in ms) else ""
        out.append(Evidence(ms[0].reference, f"{label or 'medication'}{regimen}, {len(ms)} records {first} to "
                                             f"{last.isoformat()}{active}", tuple(m.reference for m in ms[1:])))
    return out


def _taper_line(label: str, ms: list[MedicationExposure]) -> Evidence:
    """A tapering sig as one line: "prednisone 10 MG tablet, taper 60 to 2.5 mg/day, 2025-07-08 to 2025-12-01"."""
    ms = sorted(ms, key=lambda m: m.start or date.min)
    doses = [m.daily_mg for m in ms if m.daily_mg]
    span = f"{num(doses[0])} to {num(doses[-1])} mg/day" if doses else "dose not recorded"
    end = max((m.end or m.start) for m in ms if m.start)
    refs = tuple(dict.fromkeys(m.reference for m in ms[1:] if m.reference != ms[0].reference))
    return Evidence(ms[0].reference, f"{label or 'medication'}, taper {span}, {ms[0].start.isoformat()} to "
                                     f"{end.isoformat()}", refs)


def _fills_line(label: str, ms: list[MedicationExposure], as_of: date | None, window: int = 365,
                extra: str = "") -> Evidence:
    """Pharmacy fills of one medicine as one line: "VIREAD 300 MG TABLET: 12 fills 2025-04-20 to 2026-03-13, 357 days
    covered in the last 365 days"."""
    ms = sorted(ms, key=lambda m: m.start or date.min)
    first, last = ms[0].start, max(m.start for m in ms if m.start)
    covered = ""
    if as_of is not None:
        since = as_of - timedelta(days=window - 1)
        days = _union_days([(max(m.start, since), min(m.end or m.start, as_of)) for m in ms if m.start])
        covered = f", {days} days covered in the last {window} days"
    return Evidence(ms[0].reference, f"{label or 'medication'}: {len(ms)} fill{'s' if len(ms) > 1 else ''} "
                                     f"{first.isoformat()} to {last.isoformat()}{covered}{extra}",
                    tuple(m.reference for m in ms[1:]))


def _union_days(intervals: list[tuple[date, date]]) -> int:
    total = 0
    cur_s = cur_e = None
    for s, e in sorted(intervals):
        if e < s:
            continue
        if cur_e is None or s > cur_e + timedelta(days=1):
            if cur_e is not None:
                total += (cur_e - cur_s).days + 1
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += (cur_e - cur_s).days + 1
    return total
