"""The drug-safety layer: which therapy.yaml safety rules hold for a bone drug, for this patient.

Run for every osteoporosis medicine the patient is on (a conflict then leads the card as a warning) and for every
bone-drug draft at order-sign (a draft the service would offer is not offered; the reason is said). Each `when` kind
reads the assessed record; the wording and citations are the catalog's.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Callable

from ..knowledge.catalog import Catalog
from .assessment import Assessment, Conflict

# a `when` kind: (holds, format fields, references) for a drug and a rule
Check = Callable[[Assessment, str, dict], "tuple[bool, dict, list[str]]"]


class DrugSafety:
    def __init__(self, catalog: Catalog):
        self.cat = catalog
        self.cfg = catalog.therapy["safety"]
        self.rules = self.cfg["rules"]
        self.checks: dict[str, Check] = {
            "pregnant": self._pregnant, "lactating": self._lactating,
            "reproductive_potential": self._reproductive_potential, "egfr_below": self._egfr_below,
            "calcium_low": self._calcium_low, "alp_low": self._alp_low,
            "oesophageal_disorder": self._section("oesophageal_disorder"), "gastric_surgery": self._gastric_surgery,
            "recent_cardiovascular_event": self._section("cardiovascular_events"),
        }

    def conflicts(self, a: Assessment, drug: str, draft: bool = False) -> list[Conflict]:
        """Every rule that holds for `drug` (an osteoporosis_treatment name), in the catalog's order."""
        cls = self.cat.treatment_classes.get(drug)
        if cls is None:
            return []
        out = []
        for rule in self.rules:
            if cls["id"] not in rule["classes"] or (rule.get("drugs") and drug not in rule["drugs"]):
                continue
            if rule.get("drafts_only") and not draft:
                continue
            holds, fields, refs = self.checks[rule["when"]](a, drug, rule)
            if holds:
                text = rule["text"].format(drug=drug, **fields)
                out.append(Conflict(rule["id"], drug, " ".join(text.split()), list(rule["citations"]), refs))
        return out

    # ---- the `when` kinds ---------------------------------------------------------------------------
    @staticmethod
    def _pregnant(a: Assessment, drug: str, rule: dict):
        e = a.context.pregnant
        return e is not None, {"evidence": e.text if e else ""}, [e.reference] if e else []

    @staticmethod
    def _lactating(a: Assessment, drug: str, rule: dict):
        e = a.context.lactating
        return e is not None, {"evidence": e.text if e else ""}, [e.reference] if e else []

    def _reproductive_potential(self, a: Assessment, drug: str, rule: dict):
        rec = a.record
        low, high = self.cfg.get("reproductive_potential_ages", [15, 49])
        menopause = a.context.sections.get("menopause") or any(
            f.cause.id == "premature_menopause" for f in a.findings)
        holds = rec.sex == "female" and rec.age is not None and low <= rec.age <= high and not menopause \
            and a.context.pregnant is None
        return holds, {"age": rec.age}, []

    @staticmethod
    def _egfr_below(a: Assessment, drug: str, rule: dict):
        limit = rule.get("limits", {}).get(drug)
        egfr = a.context.latest_egfr
        if limit is None or egfr is None or egfr[0] >= limit:
            return False, {}, []
        return True, {"egfr": egfr[0], "date": egfr[1].isoformat(), "limit": limit}, [egfr[2]]

    def _newest(self, a: Assessment, group: str, days: int = 365):
        rec = a.record
        return rec.newest(self.cat.loinc_groups.get(group, []), rec.as_of - timedelta(days=days), valued=True)

    def _calcium_low(self, a: Assessment, drug: str, rule: dict):
        m = self._newest(a, "calcium")
        if m is None:
            return False, {}, []
        low = m.ref_low if m.ref_low is not None else self.cfg.get("calcium_below", 8.5)
        return m.value < low, {"value": m.value, "date": m.when.isoformat()}, [m.reference]

    def _alp_low(self, a: Assessment, drug: str, rule: dict):
        m = self._newest(a, "alp", 730)
        if m is None:
            return False, {}, []
        low = m.ref_low if m.ref_low is not None else self.cfg.get("alp_below", 40)
        return m.value < low, {"value": m.value, "date": m.when.isoformat()}, [m.reference]

    @staticmethod
    def _section(name: str) -> Check:
        def check(a: Assessment, drug: str, rule: dict):
            found = a.context.sections.get(name) or []
            return bool(found), {"evidence": found[0].text if found else ""}, [e.reference for e in found[:1]]
        return check

    @staticmethod
    def _gastric_surgery(a: Assessment, drug: str, rule: dict):
        f = next((f for f in a.findings if f.cause.id == "gastrectomy_bariatric" and not f.suspected), None)
        return f is not None, {}, f.references[:1] if f else []
