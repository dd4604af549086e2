"""Bone protection at prescribing: what a draft order would do to bone, and what to offer.

The draft orders are read into the patient record as planned exposures (RecordBuilder `drafts`), so
the causes' own rules (cards/causes.yaml, medications.yaml) decide whether the course, added to what
is already on record, is long-term glucocorticoid use, an aromatase inhibitor for breast cancer, androgen
deprivation or a long GnRH-agonist course in a woman. This module turns that into one decision: which drafts
call for bone protection, the ACR 2022 risk stratum where the record allows it (the same implementation as the
chart-open card: care.py), whether a DXA is due, and which drug-safety rule (if any) stands in the way of an oral
bisphosphonate draft. A bone-drug draft itself (alendronate for a pregnant woman, zoledronic acid at eGFR 28) is
checked by the drug-safety layer (therapy.yaml `safety`).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta

from ..knowledge.catalog import Catalog
from .assessment import AdviceLine, Assessment, Conflict, Finding, Risk
from ..fhir.record import MedicationExposure
from .safety import DrugSafety

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
class BoneDrugDraft:
    """A draft of an osteoporosis medicine, and the safety rules that hold against it."""
    exposure: MedicationExposure
    drug: str
    regimen: str
    conflicts: list[Conflict]


@dataclass
class ProtectionDecision:
    assessment: Assessment          # the engine's reading of the record with the drafts added
    ordered: list[OrderedDrug]      # drafts that call for bone protection (empty: no protection card)
    on_therapy: bool                # already on osteoporosis therapy: bone protection is in place
    dxa_due: bool
    risk: Risk | None               # glucocorticoids only (ACR 2022)
    line: AdviceLine | None = None  # its treatment line
    exposure: list[str] = field(default_factory=list)       # the glucocorticoid exposure in words
    guards_failed: list[str] = field(default_factory=list)  # why no bisphosphonate draft, in words
    offer_bisphosphonate: bool = False
    bone_drugs: list[BoneDrugDraft] = field(default_factory=list)   # bone-drug drafts with a safety conflict
    silenced: str | None = None     # deceased, hospice: no card

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
    dose = f" {_num(m.mg_per_dose)} mg" if m.mg_per_dose else ""
    if m.single_dose:
        return f"{drug}{dose} injection"
    per_day = m.doses_per_day
    freq = ""
    if per_day:
        freq = " " + next((w for v, w in _FREQUENCY_WORDS if abs(per_day - v) <= v * 0.1), f"{_num(per_day)} times a day")
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


def _num(x: float) -> str:
    """A number with at most one decimal ("38.1", "10")."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


class ProtectionAdvisor:
    """Decides, from an Assessment of a record that includes draft orders, what the card offers."""

    def __init__(self, catalog: Catalog):
        self.cat = catalog
        self.cfg = catalog.orders
        self.triggers = self.cfg["triggers"]
        self.guards = self.cfg["bisphosphonate_guards"]
        self.gc_settings = catalog.medication_settings["glucocorticoids"]
        self.safety = DrugSafety(catalog)

    def decide(self, a: Assessment, drafts: list[MedicationExposure]) -> ProtectionDecision:
        ctx = a.context
        by_cause = {f.cause.id: f for f in a.findings if not f.suspected}
        ordered: list[OrderedDrug] = []
        for t in self.triggers:
            finding = by_cause.get(t["cause"])
            if finding is None:
                continue
            counted = set(finding.references)
            for m in drafts:
                name = next((i.name for i in m.ingredients if i.cause_id == t["cause"]
                             and (not t.get("ingredients") or i.name in t["ingredients"])), None)
                if name is not None and m.reference in counted:
                    ordered.append(OrderedDrug(t, m, regimen_text(m, name)))
        decision = ProtectionDecision(a, ordered, on_therapy=bool(ctx.treated), dxa_due=False, risk=None,
                                      silenced=a.silenced)
        decision.bone_drugs = self._bone_drug_drafts(a, drafts)
        if not ordered or decision.on_therapy or decision.silenced:
            return decision
        recent = ctx.last_dxa is not None and ctx.last_dxa >= a.as_of - timedelta(days=decision.dxa_window_days)
        decision.dxa_due = not recent and ctx.pregnant is None
        gc = by_cause.get("glucocorticoids") if any(o.trigger.get("risk") == "glucocorticoid" for o in ordered) else None
        if gc is not None:
            decision.exposure = self._gc_exposure(gc, {o.exposure.reference for o in ordered})
            decision.risk = a.care.gc_risk if a.care else None
            decision.line = a.care.gc_line if a.care else None
            offer = decision.risk is not None and decision.risk.level in self.cfg["glucocorticoid_risk"]["offer_therapy_from"]
        else:
            offer = False
        if offer:
            decision.guards_failed = self._guards(a)
            decision.offer_bisphosphonate = not decision.guards_failed
        return decision

    def _bone_drug_drafts(self, a: Assessment, drafts: list[MedicationExposure]) -> list[BoneDrugDraft]:
        """Every osteoporosis-medicine draft with a safety rule against it (for this patient, today)."""
        out = []
        for m in drafts:
            name = next((i.name for i in m.ingredients if i.cause_id == "osteoporosis_treatment"
                         and i.name in self.cat.treatment_classes), None)
            if name is None:
                continue
            conflicts = self.safety.conflicts(a, name, draft=True)
            if conflicts:
                out.append(BoneDrugDraft(m, name, regimen_text(m, name), conflicts))
        return out

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

    # ---- what stands in the way of an oral bisphosphonate draft ----------------------------------------
    def _guards(self, a: Assessment) -> list[str]:
        """Results the label asks for before the first dose (missing or out of range), a treatment line that rules
        out a bone drug for this patient (young adult, pregnancy or lactation, CKD G4-G5), and every drug-safety
        rule that holds for alendronate (therapy.yaml `safety`)."""
        g, texts = self.guards, self.guards["texts"]
        rec = a.record
        since = rec.as_of - timedelta(days=g["within_days"])
        failed = []
        line = a.care.line if a.care else None
        special = next((x for x in ([line] if line else []) if x.no_drug_drafts), None)
        if special is not None:
            failed.append(texts["advice"].format(text=special.short or special.text))
        egfr = self._latest(a, "egfr", since)
        if egfr is None:
            failed.append(texts["egfr_missing"])
        calcium = self._latest(a, "calcium", since)
        low, high = g["calcium_range"]
        if calcium is None:
            failed.append(texts["calcium_missing"])
        elif calcium.value > high:
            failed.append(texts["calcium_out"].format(value=calcium.value, date=calcium.when.isoformat(), low=low, high=high))
        vit_d = self._latest(a, "vitamin_d", since)
        if vit_d is None:
            failed.append(texts["vitamin_d_missing"])
        elif vit_d.value < g["vitamin_d_at_least"]:
            failed.append(texts["vitamin_d_low"].format(value=vit_d.value, date=vit_d.when.isoformat(),
                                                        limit=g["vitamin_d_at_least"]))
        failed += [c.text for c in self.safety.conflicts(a, "alendronate", draft=True)]
        return list(dict.fromkeys(failed))

    def _latest(self, a: Assessment, group: str, since):
        return a.record.newest(self.cat.loinc_groups.get(group, []), since, valued=True)


class ShownDrafts:
    """Drafts that had their card at order-select, so that the same draft gets one card across order-select and
    order-sign. Per process, bounded, entries expire; only a keyed digest of the FHIR server, patient and draft is
    kept, never the ids themselves. (With several workers, a sign that lands on another worker than its select shows
    the card again: safe, and rare behind a sticky load balancer.)"""

    def __init__(self, ttl_s: float = 12 * 3600, capacity: int = 20000):
        self.ttl_s, self.capacity = ttl_s, capacity
        self._seen: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._salt = hashlib.sha256(str(time.time_ns()).encode()).digest()

    def key(self, fhir_server: str, patient_id: str, draft: dict) -> bytes:
        """The draft's id and what it orders (an EHR may reuse one id for every draft: the CDS Hooks sandbox sends
        "request-123" whatever the drug)."""
        content = repr(sorted((k, repr(draft.get(k))) for k in ("id", "medicationCodeableConcept", "medicationReference",
                                                                "dosageInstruction", "dispenseRequest")))
        return hashlib.blake2b(f"{fhir_server}|{patient_id}|{content}".encode(), key=self._salt[:32],
                               digest_size=16).digest()

    def shown_at_select(self, key: bytes, now: float | None = None) -> bool:
        """True when this draft's card went out at order-select within the time to live (the order-sign of the same
        draft then adds nothing)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hit = self._seen.get(key)
            return hit is not None and now - hit[0] < self.ttl_s and hit[1] == "order-select"

    def remember(self, key: bytes, hook: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._seen[key] = (now, hook)
            self._seen.move_to_end(key)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
