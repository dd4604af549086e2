"""`kind: persistent`: a result on one side of a threshold for longer than a span, with no day on the other side
in between (KDIGO chronicity); also refutes an old code that later normal results contradict."""
from __future__ import annotations

from datetime import date

from ...fhir.record import Measurement, PatientRecord, ckd_epi_2021
from ..assessment import Evidence
from .results import VALUE, measure_text


def evaluate(rule: dict, rec: PatientRecord, since: date) -> list[Evidence]:
    run = persistent_run(rule, rec, since)
    return [Evidence(m.reference, measure_text(rule, m)) for m in run]


def persistent_run(rule: dict, rec: PatientRecord, since: date) -> tuple[Measurement, ...]:
    """(oldest, newest) of the newest run of days on the qualifying side of the threshold, with no day on the other side
    in between, spanning at least `min_span_days` (KDIGO chronicity: > 3 months). Several results
    on one day are read as one: the day qualifies on its lowest value for `below` (highest for
    `at_least`). A low result the same day's creatinine contradicts is not read."""
    results = [m for m in rec.results(rule["loinc"], since) if m.when <= rec.as_of and m.value is not None]
    if not results:
        return ()
    below, at_least = rule.get("below"), rule.get("at_least")
    creatinine = _creatinine_by_day(rule, rec, since) if rule.get("creatinine_contradicts_by") else {}
    days: dict[date, list[Measurement]] = {}
    for m in results:                            # newest first
        if creatinine and below is not None and m.value < below and _contradicted(m, creatinine, rule, rec):
            continue
        days.setdefault(m.when, []).append(m)
    run: list[Measurement] = []                  # one result per day, newest first
    for day, ms in days.items():
        pick = min(ms, key=VALUE) if below is not None else max(ms, key=VALUE)
        ok = pick.value < below if below is not None else pick.value >= at_least
        if not ok:
            break
        run.append(pick)
    if not run or (rule.get("latest_must_qualify") and run[0].when != next(iter(days))):
        return ()
    newest, oldest = run[0], run[-1]
    if (newest.when - oldest.when).days < rule["min_span_days"]:
        return ()
    return oldest, newest


def _creatinine_by_day(rule: dict, rec: PatientRecord, since: date) -> dict[date, float]:
    out: dict[date, float] = {}
    for m in rec.results(rule.get("creatinine_loinc", ()), since):
        if m.value is not None:
            out[m.when] = max(out.get(m.when, 0.0), m.value)
    return out


def _contradicted(m: Measurement, creatinine: dict[date, float], rule: dict, rec: PatientRecord) -> bool:
    scr = creatinine.get(m.when)
    age = rec.age_on(m.when)
    if scr is None or age is None or rec.sex not in ("male", "female"):
        return False
    computed = ckd_epi_2021(scr, age, rec.sex)
    return computed >= rule["below"] and computed - m.value > rule["creatinine_contradicts_by"]
