"""patient-view: at chart open, the recorded causes of secondary osteoporosis, the treatment gap and the workup."""
from __future__ import annotations

from ..clinical.assessment import Assessment
from ..fhir.prefetch import PrefetchResult
from ..fhir.record import PatientRecord
from .base import CdsService


class SecondaryOsteoporosis(CdsService):
    id = "secondary-osteoporosis"
    hook = "patient-view"
    title = "Secondary osteoporosis causes"
    description = ("Finds recorded causes of secondary osteoporosis (medicines such as long-term glucocorticoids, "
                   "and endocrine, GI, rheumatologic, hematologic, renal and lifestyle causes), shows the evidence "
                   "and offers the guideline workup.")
    snoozable = True

    def decide(self, request: dict, prefetch: PrefetchResult, record: PatientRecord) -> tuple[Assessment, Assessment]:
        assessment = self.kit.engine.assess(record)
        return assessment, assessment

    def render(self, decision: Assessment) -> list[dict]:
        return self.kit.renderer.render(decision)


def explain(assessment: Assessment) -> list[dict]:
    """The --explain findings list: every cause found, the resources it rests on, its role on the card ("fires" on its
    own, "listed" beside a cause that fires, "suspected": a rule-out or provisional diagnosis), and the variant that
    names it for this patient (lithium-associated hyperparathyroidism)."""
    out = []
    for f in assessment.findings:
        item = {"cause": f.cause.id, "evidence": f.references, "listed_only": not f.fires_alone,
                "role": "suspected" if f.suspected else "fires" if f.fires_alone else "listed"}
        if f.variant and f.variant.get("label"):
            item["variant"] = f.variant["id"]
        out.append(item)
    return out


def explain_context(assessment: Assessment) -> dict:
    """The --explain context a reviewer needs to check the card: treatment gap, therapy history and alerts, drug
    safety, risk and the treatment line, kidney caution, latest eGFR, pregnancy, and why a card may be silenced."""
    ctx = assessment.context
    care = assessment.care
    course = ctx.courses[0] if ctx.courses else None
    return {
        "treatment_gap": ctx.treatment_gap,
        "on_treatment": {"drug": course.drug, "since": course.start.isoformat()} if course else None,
        "therapy": [{"drug": c.drug, "class": c.class_id, "start": c.start.isoformat(), "last": c.last.isoformat(),
                     "state": c.state, "next_due": c.next_due.isoformat() if c.next_due else None,
                     "evidence": c.references} for c in ctx.therapy.courses],
        "next_decision": ctx.next_decision,
        "alerts": [{"kind": x.kind, "evidence": x.references} for x in care.alerts] if care else [],
        "drug_safety": [{"rule": c.rule, "drug": c.drug, "evidence": c.references} for c in care.conflicts] if care else [],
        "risk": {"level": care.risk.level, "reasons": care.risk.reasons} if care and care.risk else None,
        "glucocorticoid_risk": care.gc_risk.level if care and care.gc_risk else None,
        "treatment_line": care.line.id if care and care.line and ctx.treatment_gap else None,
        "fractures": [{"site": f.site, "date": f.when.isoformat() if f.when else None, "evidence": f.reference}
                      for f in ctx.fractures],
        "kidney_caution": bool(ctx.kidney_caution),
        "latest_egfr": {"value": round(ctx.latest_egfr[0], 1), "date": ctx.latest_egfr[1].isoformat()}
        if ctx.latest_egfr else None,
        "latest_t_score": {"value": round(ctx.latest_t_score[0], 1), "site": ctx.latest_t_score[1],
                           "date": ctx.latest_t_score[2].isoformat()} if ctx.latest_t_score else None,
        "young_adult": ctx.young_adult,
        "pregnant": ctx.pregnant is not None,
        "lactating": ctx.lactating is not None,
        "silenced": assessment.silenced,
    }
