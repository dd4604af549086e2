"""What a screen makes of the findings lines: the worklist (who needs attention, most urgent first), the alert
burden a governance committee asks for, and the run's tallies. Everything here reads the same line
`cds-service evaluate --explain` prints, so a worklist and a card can never disagree."""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta

WORKLIST_COLUMNS = ("priority", "patient", "age", "sex", "indicator", "summary", "causes", "treatment_gap",
                    "kidney_caution", "last_dxa", "next_step")

# most urgent first: a fracture on therapy, then an untreated fragility fracture, then the other therapy alerts and
# drug-safety conflicts, an untreated osteoporosis, a warning card, an information card
PRIORITY = {1: "treatment failure", 2: "untreated fracture", 3: "therapy alert or drug-safety conflict",
            4: "untreated osteoporosis", 5: "warning card", 6: "information card"}


def priority(line: dict) -> int:
    ctx = line["context"]
    kinds = {a["kind"] for a in ctx["alerts"]}
    if "treatment_failure" in kinds:
        return 1
    if ctx["treatment_gap"] and ctx["fractures"]:
        return 2
    if kinds or ctx["drug_safety"]:
        return 3
    if ctx["treatment_gap"]:
        return 4
    return 5 if any(c.get("indicator") == "warning" for c in line["cards"]) else 6


def next_step(line: dict) -> str:
    """The one next step, in words: a therapy alert or safety conflict first, then the treatment gap, then what the
    card offers first (its DXA when it offers one)."""
    ctx = line["context"]
    if ctx["alerts"]:
        return "Review osteoporosis therapy: " + ctx["alerts"][0]["kind"].replace("_", " ")
    if ctx["drug_safety"]:
        c = ctx["drug_safety"][0]
        return f"Review {c['drug']}: {c['rule'].replace('_', ' ')}"
    if ctx["treatment_gap"]:
        return "Start osteoporosis treatment" + (f" ({ctx['treatment_line'].replace('_', ' ')})"
                                                 if ctx.get("treatment_line") else "")
    if ctx.get("next_decision"):
        return str(ctx["next_decision"])
    labels = [s.get("label", "") for c in line["cards"] for s in c.get("suggestions", [])]
    return next((x for x in labels if "DXA" in x), labels[0] if labels else "")


def indicator_of(line: dict) -> str:
    """The loudest card's indicator: "warning", "info", or "" when there is no card."""
    cards = line["cards"]
    return "warning" if any(c.get("indicator") == "warning" for c in cards) else "info" if cards else ""


def worklist_row(line: dict, age: int | None, sex: str | None) -> dict | None:
    """The patient's worklist row, or None when there is neither a card nor a treatment gap."""
    ctx = line["context"]
    if not line["cards"] and not ctx["treatment_gap"]:
        return None
    t = ctx.get("latest_t_score")
    return {"priority": priority(line), "patient": line["patient"], "age": age, "sex": sex or "",
            "indicator": indicator_of(line), "summary": line["cards"][0]["summary"] if line["cards"] else "",
            "causes": "; ".join(f["cause"] for f in line["findings"] if f["role"] == "fires"),
            "treatment_gap": bool(ctx["treatment_gap"]), "kidney_caution": bool(ctx["kidney_caution"]),
            "last_dxa": t["date"] if t else "", "next_step": next_step(line)}


@dataclass
class PatientFacts:
    """What the tallies need from one findings line. Made where the line is made (the worker), so the parent
    writes the line as it comes and never parses it back."""
    patient: str
    indicator: str                    # of the loudest card; "" without a card
    found: list[str]                  # causes found, any role
    firing: list[str]                 # causes that fire the card
    gaps: list[str]                   # treatment gap and therapy alert kinds, in words
    row: dict | None                  # the worklist row
    age: int | None
    sex: str | None


def patient_facts(line: dict, age: int | None, sex: str | None) -> PatientFacts:
    ctx = line["context"]
    gaps = (["untreated fracture" if ctx["fractures"] else "untreated osteoporosis"] if ctx["treatment_gap"] else []) \
        + [a["kind"].replace("_", " ") for a in ctx["alerts"]]
    return PatientFacts(line["patient"], indicator_of(line), [f["cause"] for f in line["findings"]],
                        [f["cause"] for f in line["findings"] if f["role"] == "fires"], gaps,
                        worklist_row(line, age, sex), age, sex)


def write_worklist_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=WORKLIST_COLUMNS)
        w.writeheader()
        for row in sorted(rows, key=lambda r: (r["priority"], r["patient"])):
            w.writerow(row)


@dataclass
class Tally:
    """Counts over the screened patients, for summary.json and the report."""
    patients: int = 0
    cards: Counter = field(default_factory=Counter)              # by indicator
    causes_found: Counter = field(default_factory=Counter)       # patients with the cause found (any role)
    causes_firing: Counter = field(default_factory=Counter)      # patients whose card the cause fires
    treatment_gaps: Counter = field(default_factory=Counter)     # by kind
    flagged_age: Counter = field(default_factory=Counter)        # by 10-year band
    flagged_sex: Counter = field(default_factory=Counter)
    failed: list[dict] = field(default_factory=list)
    flagged: dict[str, tuple[str, list[str]]] = field(default_factory=dict)   # patient -> (indicator, causes firing)

    def add(self, facts: PatientFacts) -> None:
        self.patients += 1
        self.causes_found.update(facts.found)
        if facts.indicator:
            self.cards[facts.indicator] += 1
            self.causes_firing.update(facts.firing)
            self.flagged[facts.patient] = (facts.indicator, facts.firing)
        self.treatment_gaps.update(facts.gaps)
        if facts.row is not None:
            self.flagged_age[_band(facts.age)] += 1
            self.flagged_sex[facts.sex or "unknown"] += 1


def _band(age: int | None) -> str:
    if age is None:
        return "unknown"
    low = min(age // 10 * 10, 90)
    return f"{low}+" if low == 90 else f"{low}-{low + 9}"


def burden_window(as_of: date) -> tuple[str, str]:
    """The 12 months of Encounters the alert burden counts: start dates after the first, up to the second."""
    return (as_of - timedelta(days=365)).isoformat(), as_of.isoformat()


def alert_burden(tally: Tally, encounters: list[tuple[str, str | None, str | None]], as_of: date) -> dict:
    """Expected cards per 1,000 chart openings and per clinic day, taking each Encounter of the last 12 months
    as one chart opening (a patient with a card shows it at every opening; snooze would lower this)."""
    since, upto = burden_window(as_of)
    openings, days = 0, set()
    flagged_openings: Counter = Counter()            # by indicator
    by_cause: Counter = Counter()
    by_location: Counter = Counter()
    location_openings: Counter = Counter()
    for pid, start, location in encounters:
        day = (start or "")[:10]
        if not (since < day <= upto):
            continue
        openings += 1
        days.add(day)
        where = location or "not recorded"
        location_openings[where] += 1
        hit = tally.flagged.get(pid)
        if hit is None:
            continue
        flagged_openings[hit[0]] += 1
        by_location[where] += 1
        for cause in hit[1]:
            by_cause[cause] += 1
    cards = sum(flagged_openings.values())
    per_1000 = (lambda n: round(1000 * n / openings, 1)) if openings else (lambda n: None)
    per_day = (lambda n: round(n / len(days), 2)) if days else (lambda n: None)
    return {
        "window": {"from": since, "to": upto}, "chart_openings": openings, "clinic_days": len(days),
        "cards_per_1000_openings": per_1000(cards), "cards_per_clinic_day": per_day(cards),
        "by_indicator": {k: {"per_1000_openings": per_1000(v), "per_clinic_day": per_day(v)}
                         for k, v in sorted(flagged_openings.items())},
        "by_cause": {k: per_1000(v) for k, v in by_cause.most_common()},
        "by_location": {k: {"openings": location_openings[k],
                            "cards_per_1000_openings": round(1000 * v / location_openings[k], 1)}
                        for k, v in by_location.most_common(20)},
    }
