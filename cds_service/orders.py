"""Bone protection at prescribing: what a draft order would do to bone, and what to offer.

The draft orders are read into the patient record as planned exposures (RecordBuilder `drafts`), so
the causes' own rules (cards/causes.yaml, medications.yaml) decide whether the course, added to what
is already on record, is long-term glucocorticoid use, an aromatase inhibitor or androgen
deprivation. This module turns that into one decision: which drafts call for bone protection, the
ACR 2022 risk stratum where the record allows it, whether a DXA is due, and which safety guard (if
any) stands in the way of an oral bisphosphonate draft (cards/orders.yaml).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta

from .catalog import Catalog
from .engine import Assessment, Finding
from .record import MedicationExposure, PatientRecord, concept_label, concept_text, status_code

_FREQUENCY_WORDS = ((4, "four times daily"), (3, "three times daily"), (2, "twice daily"), (1, "daily"),
                    (0.5, "every other day"), (1 / 7, "weekly"), (1 / 30, "monthly"), (1 / 91, "every 3 months"),
                    (1 / 182, "every 6 months"))


@dataclass
class OrderedDrug:
    """A draft order that takes bone away, with the regimen in words."""
    trigger: dict                   # orders.yaml trigger
    exposure: MedicationExposure
    regimen: str                    # "Prednisone 10 mg daily for 3 months"


@dataclass
class Risk:
    stratum: str | None             # very_high, high, moderate, low; None when the record cannot decide
    label: str
    reasons: list[str]


@dataclass
class ProtectionDecision:
    assessment: Assessment          # the engine's reading of the record with the drafts added
    ordered: list[OrderedDrug]      # drafts that call for bone protection (empty: no card)
    on_therapy: bool                # already on osteoporosis therapy: bone protection is in place
    dxa_due: bool
    risk: Risk | None               # glucocorticoids only
    exposure: list[str] = field(default_factory=list)       # the glucocorticoid exposure in words
    guards_failed: list[str] = field(default_factory=list)  # why no bisphosphonate draft, in words
    offer_bisphosphonate: bool = False

    @property
    def lead(self) -> OrderedDrug:
        return self.ordered[0]

    @property
    def dxa_window_days(self) -> int:
        """A DXA this recent needs no repeat for any of the drugs ordered."""
        return max(o.trigger["dxa_within_days"] for o in self.ordered)


def regimen_text(m: MedicationExposure, name: str) -> str:
    """"Prednisone 10 mg daily for 3 months", "Leuprolide 22.5 mg injection" (words, no ids)."""
    drug = name[:1].upper() + name[1:]
    dose = f" {m.mg_per_dose:g} mg" if m.mg_per_dose else ""
    if m.single_dose:
        return f"{drug}{dose} injection"
    per_day = m.doses_per_day
    freq = ""
    if per_day:
        freq = " " + next((w for v, w in _FREQUENCY_WORDS if abs(per_day - v) <= v * 0.1), f"{per_day:g} times a day")
    days = (m.end - m.start).days + 1 if (m.start and m.end) else 0
    if days <= 1:
        return f"{drug}{dose}{freq}"
    months = days / 30 if days % 30 == 0 else days / 30.4
    if days >= 56 and abs(months - round(months)) <= 0.15:
        length = f"{round(months)} months"
    elif days >= 14 and days % 7 == 0:
        length = f"{days // 7} weeks"
    else:
        length = f"{days} days"
    return f"{drug}{dose}{freq} for {length}"


class ProtectionAdvisor:
    """Decides, from an Assessment of a record that includes draft orders, what the card offers."""

    def __init__(self, catalog: Catalog):
        self.cat = catalog
        self.cfg = catalog.orders
        self.triggers = self.cfg["triggers"]
        self.guards = self.cfg["bisphosphonate_guards"]
        self.gc_settings = catalog.medication_settings["glucocorticoids"]
        words = self.guards["oesophagus_words"]
        self.oesophagus = re.compile("|".join(rf"(?<![a-z]){re.escape(w.lower())}" for w in words)) if words else None

    def decide(self, a: Assessment, drafts: list[MedicationExposure], prefetch: dict) -> ProtectionDecision:
        """`prefetch`: the request's prefetch data, whose problem list the oesophagus guard reads for words
        the catalog has no cause for (only when a bisphosphonate is in question)."""
        ctx = a.context
        by_cause = {f.cause.id: f for f in a.findings}
        ordered: list[OrderedDrug] = []
        for t in self.triggers:
            finding = by_cause.get(t["cause"])
            if finding is None:
                continue
            counted = set(finding.references)
            for m in drafts:
                name = next((i.name for i in m.ingredients if i.cause_id == t["cause"]), None)
                if name is not None and m.reference in counted:
                    ordered.append(OrderedDrug(t, m, regimen_text(m, name)))
        on_therapy = bool(ctx.treatments)
        decision = ProtectionDecision(a, ordered, on_therapy, dxa_due=False, risk=None)
        if not ordered or on_therapy:
            return decision
        recent = ctx.last_dxa is not None and ctx.last_dxa >= a.as_of - timedelta(days=decision.dxa_window_days)
        decision.dxa_due = not recent and ctx.pregnant is None
        gc = by_cause.get("glucocorticoids") if any(o.trigger.get("risk") == "glucocorticoid" for o in ordered) else None
        if gc is not None:
            decision.exposure = self._gc_exposure(gc, {o.exposure.reference for o in ordered})
            decision.risk = self._gc_risk(a, gc)
            offer = decision.risk.stratum in self.cfg["glucocorticoid_risk"]["offer_therapy_from"]
        else:
            offer = False
        if offer:
            decision.guards_failed = self._guards(a, prefetch)
            decision.offer_bisphosphonate = not decision.guards_failed
        return decision

    def _gc_exposure(self, gc: Finding, drafts: set[str]) -> list[str]:
        """What is already on record, then the total with this order, in words."""
        cfg = self.cfg["glucocorticoid_exposure"]
        out = [cfg["on_record"].format(text=e.text) for e in gc.evidence
               if e.numbers is None and e.reference not in drafts and not set(e.others) & drafts]
        total = next((e.numbers for e in gc.evidence if e.numbers), None)
        if total:
            out.append(cfg["total"].format(days=total["days_total"], peak=total["peak_mg_per_day"],
                                           threshold=self.gc_settings["min_mg_per_day"],
                                           min_days=self.gc_settings["min_days"]))
        return out

    # ---- ACR 2022 risk -----------------------------------------------------------------------
    def _gc_risk(self, a: Assessment, gc: Finding) -> Risk:
        cfg = self.cfg["glucocorticoid_risk"]
        ctx = a.context
        t = ctx.latest_t_score
        fields = {"t_score": t[0], "site": t[1] or "site not recorded", "date": t[2].isoformat()} if t else {}
        notes = []
        if gc.tier in ("high", "very_high") and cfg.get("high_dose_note"):
            notes.append(cfg["high_dose_note"])
        for s in cfg["strata"]:
            (kind, value), = s["when"].items()
            holds = (kind == "fragility_fracture" and bool(ctx.fractures)) \
                or (kind == "very_high_dose" and gc.tier == "very_high") \
                or (kind == "t_score_at_most" and t is not None and t[0] <= value) \
                or (kind == "t_score_below" and t is not None and t[0] < value)
            if holds:
                reasons = [s["reason"].format(**fields) if fields else s["reason"]]
                if kind == "fragility_fracture":
                    reasons = [f"{s['reason']}: " + "; ".join(e.text for e in ctx.fractures[:2])]
                if s["id"] == "very_high" and cfg.get("very_high_note"):
                    notes.append(cfg["very_high_note"])
                return Risk(s["id"], s["label"], reasons + notes)
        age = a.record.age
        frax = cfg["frax_text"] if age is not None and age >= cfg["frax_from_age"] else ""
        if t is not None:
            return Risk("low", "low by bone density", [cfg["low_with_dxa"].format(**fields)] + notes)
        return Risk(None, "not yet known", [cfg["undetermined"].format(frax=frax)] + notes)

    # ---- bisphosphonate safety guards ----------------------------------------------------------
    def _guards(self, a: Assessment, prefetch: dict) -> list[str]:
        g, texts = self.guards, self.guards["texts"]
        rec, ctx = a.record, a.context
        since = rec.as_of - timedelta(days=g["within_days"])
        failed = []
        if ctx.kidney_caution and not (ctx.latest_egfr and ctx.latest_egfr[0] < g["egfr_at_least"]):
            failed.append(texts["kidney_caution"])
        egfr = self._latest(rec, "egfr", since)
        if egfr is None:
            failed.append(texts["egfr_missing"])
        elif egfr.value < g["egfr_at_least"]:
            failed.append(texts["egfr_low"].format(value=egfr.value, date=egfr.when.isoformat(), limit=g["egfr_at_least"]))
        calcium = self._latest(rec, "calcium", since)
        low, high = g["calcium_range"]
        if calcium is None:
            failed.append(texts["calcium_missing"])
        elif not low <= calcium.value <= high:
            failed.append(texts["calcium_out"].format(value=calcium.value, date=calcium.when.isoformat(), low=low, high=high))
        vit_d = self._latest(rec, "vitamin_d", since)
        if vit_d is None:
            failed.append(texts["vitamin_d_missing"])
        elif vit_d.value < g["vitamin_d_at_least"]:
            failed.append(texts["vitamin_d_low"].format(value=vit_d.value, date=vit_d.when.isoformat(),
                                                        limit=g["vitamin_d_at_least"]))
        if self.oesophagus is not None:
            hit = next((label for words, label in current_problems(prefetch, self.cat.statuses)
                        if self.oesophagus.search(words.lower())), None)
            if hit is not None:
                failed.append(texts["oesophagus"].format(text=hit))
        if g.get("gastric_surgery_cause") and any(f.cause.id == g["gastric_surgery_cause"] for f in a.findings):
            failed.append(texts["gastric_surgery"])
        if ctx.pregnant is not None:
            failed.append(texts["pregnant"])
        return failed

    def _latest(self, rec: PatientRecord, group: str, since):
        return rec.newest(self.cat.loinc_groups.get(group, []), since, valued=True)


def current_problems(prefetch: dict, statuses: dict) -> list[tuple[str, str]]:
    """(every name it carries, the name to show) of each current Condition in the prefetch: not resolved,
    inactive, refuted or entered in error."""
    clinical = set(statuses.get("condition_clinical", []))
    excluded = set(statuses.get("condition_verification_excluded", []))
    out = []
    for value in prefetch.values():
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
            continue
        for entry in value.get("entry") or ():
            res = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(res, dict) or res.get("resourceType") != "Condition":
                continue
            if status_code(res.get("clinicalStatus")) not in clinical | {None}:
                continue
            if status_code(res.get("verificationStatus")) in excluded:
                continue
            words = concept_text(res.get("code"))
            if words.strip():
                out.append((words, concept_label(res.get("code"))))
    return out
