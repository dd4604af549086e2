"""patient-view: at chart open, the recorded causes of secondary osteoporosis, the treatment gap and the workup."""
from __future__ import annotations

from ..engine import Assessment
from ..prefetch import PrefetchResult
from ..record import PatientRecord
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
    """The --explain findings list: every cause found, the resources it rests on, and whether it is only
    listed on a card that fires for another reason."""
    return [{"cause": f.cause.id, "evidence": f.references, "listed_only": not f.fires_alone}
            for f in assessment.findings]


def explain_context(assessment: Assessment) -> dict:
    """The --explain context a reviewer needs to check the card: treatment gap, current therapy,
    kidney caution, latest eGFR and pregnancy."""
    ctx = assessment.context
    course = ctx.courses[0] if ctx.courses else None
    return {
        "treatment_gap": ctx.treatment_gap,
        "on_treatment": {"drug": course.drug, "since": course.since.isoformat()} if course else None,
        "next_decision": ctx.next_decision,
        "kidney_caution": bool(ctx.kidney_caution),
        "latest_egfr": {"value": round(ctx.latest_egfr[0], 1), "date": ctx.latest_egfr[1].isoformat()}
        if ctx.latest_egfr else None,
        "latest_t_score": {"value": round(ctx.latest_t_score[0], 1), "site": ctx.latest_t_score[1],
                           "date": ctx.latest_t_score[2].isoformat()} if ctx.latest_t_score else None,
        "pregnant": ctx.pregnant is not None,
    }
