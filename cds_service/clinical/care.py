"""What the record means for treatment, after the causes are found: the fracture-risk level (AACE 2020; ACR 2022 for
glucocorticoids), the treatment line fitted to the patient, therapy alerts (an overdue denosumab dose, an anabolic
course with no follow-on, a fracture on therapy), the next decision on therapy, and drug-safety conflicts for the drugs
the patient is on. One implementation serves the chart-open card and the prescribing card.

The rules and their wording are cards/therapy.yaml (and orders.yaml for the ACR 2022 strata); this module decides
which hold.
"""
from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from ..knowledge.catalog import Catalog
from .assessment import AdviceLine, Assessment, CarePlan, Finding, Risk, TherapyAlert
from .safety import DrugSafety
from .therapy import CURRENT, OVERDUE, Course

if TYPE_CHECKING:
    from .engine import Engine


class CarePlanner:
    def __init__(self, catalog: Catalog, engine: "Engine"):
        self.cat = catalog
        self.engine = engine
        self.th = catalog.therapy
        self.therapy_cfg = self.th["therapy"]
        self.advice = self.th["advice"]
        self.gc_cfg = catalog.orders["glucocorticoid_risk"]
        self.safety = DrugSafety(catalog)

    def plan(self, a: Assessment) -> CarePlan:
        ctx = a.context
        plan = CarePlan()
        gc = next((f for f in a.findings if f.cause.id == "glucocorticoids" and not f.suspected), None)
        bone = bool(ctx.osteoporosis or ctx.gap_fractures or ctx.low_bmd or ctx.treated)
        plan.alerts = self._alerts(a)
        if bone or plan.alerts:
            plan.risk = self._risk(a, gc, plan.alerts)
        if gc is not None:
            plan.gc_risk = self.gc_risk(a, gc)
            plan.gc_line = self._gc_line(a, plan.gc_risk)
        plan.line = self._line(a, plan.risk)
        # what else to act on, beside (or, with no treatment gap, instead of) the treatment line
        plan.also = [x for x in self._also(a) if not (ctx.treatment_gap and plan.line and plan.line.id in x.id)]
        ctx.next_decision = self._next_decision(a, plan)
        for course in ctx.courses + [c for c in ctx.therapy.courses if c.state == OVERDUE]:
            plan.conflicts += self.safety.conflicts(a, course.drug)
        plan.screening = self._screening(a)
        recent = a.as_of - timedelta(days=730)
        if ctx.normal_bmd_fractures and ctx.latest_t_score and not ctx.treated \
                and any(f.when and f.when >= recent for f in ctx.normal_bmd_fractures):
            value, _, day = ctx.latest_t_score
            plan.normal_bmd_note = self.advice["wording"]["normal_bmd_fracture"].format(
                fractures="; ".join(f.text for f in ctx.normal_bmd_fractures[:2]), t_score=value, date=day.isoformat())
        return plan

    # ---- risk ----------------------------------------------------------------------------------------
    def _risk(self, a: Assessment, gc: Finding | None, alerts: list[TherapyAlert]) -> Risk:
        """AACE 2020: very high with a recent fracture, several fractures, a fracture on therapy or on high-dose
        glucocorticoids, a very low T-score or a high FRAX; high otherwise."""
        cfg = self.advice["risk"]
        words = cfg["wording"]
        ctx, as_of = a.context, a.as_of
        reasons = []
        fractures = ctx.gap_fractures
        recent = as_of - timedelta(days=cfg["recent_fracture_days"])
        if any(f.when and recent <= f.when <= as_of for f in fractures):
            reasons.append(words["recent_fracture"])
        distinct = {(f.site, f.when) for f in fractures}
        if len(distinct) >= cfg["multiple_fractures"]:
            reasons.append(words["multiple_fractures"].format(n=len(distinct)))
        t = ctx.latest_t_score
        if t is not None and not ctx.young_adult and t[0] <= cfg["t_score_at_most"]:
            reasons.append(words["t_score"].format(value=t[0]))
        if any(alert.kind == "treatment_failure" for alert in alerts):
            reasons.append(words["fracture_on_therapy"])
        if gc is not None and fractures and gc.tier in cfg.get("very_high_glucocorticoid_tiers", ()):
            reasons.append(words["glucocorticoids"])
        if ctx.latest_frax and cfg.get("frax_mof_at_least") and ctx.latest_frax[0] >= cfg["frax_mof_at_least"]:
            reasons.append(words["frax"].format(value=ctx.latest_frax[0]))
        return Risk("very_high" if reasons else "high", "very high" if reasons else "high", reasons, cfg["citation"])

    def gc_risk(self, a: Assessment, gc: Finding) -> Risk:
        """ACR 2022 glucocorticoid-induced osteoporosis strata (orders.yaml glucocorticoid_risk), first that holds.
        Under 40 the Z-score and fractures decide, not the T-score."""
        cfg = self.gc_cfg
        ctx = a.context
        age = a.record.age
        t, z = ctx.latest_t_score, ctx.latest_z_score
        notes = []
        if gc.tier in ("high", "very_high") and cfg.get("high_dose_note"):
            notes.append(cfg["high_dose_note"])
        for s in cfg["strata"]:
            (kind, value), = s["when"].items()
            if s.get("from_age") and (age is None or age < s["from_age"]):
                continue
            if s.get("under_age") and (age is None or age >= s["under_age"]):
                continue
            score = z if kind.startswith("z_score") else t
            fields = {"t_score": score[0], "site": score[1] or "site not recorded", "date": score[2].isoformat()} \
                if score else {}
            holds = (kind == "fragility_fracture" and bool(ctx.fractures)) \
                or (kind == "very_high_dose" and gc.tier == "very_high") \
                or (kind in ("t_score_at_most", "z_score_at_most") and score is not None and score[0] <= value) \
                or (kind in ("t_score_below", "z_score_below") and score is not None and score[0] < value)
            if holds:
                reasons = [s["reason"].format(**fields) if fields else s["reason"]]
                if kind == "fragility_fracture":
                    reasons = [f"{s['reason']}: " + "; ".join(f.text for f in ctx.fractures[:2])]
                if s["id"] == "very_high" and cfg.get("very_high_note"):
                    notes.append(cfg["very_high_note"])
                return Risk(s["id"], s["label"], reasons + notes, cfg["citation"])
        frax = cfg["frax_text"] if age is not None and age >= cfg["frax_from_age"] else ""
        if age is not None and age < 40 and cfg.get("undetermined_young"):
            return Risk("undetermined", "not yet known", [cfg["undetermined_young"]] + notes, cfg["citation"])
        if t is not None and (age is None or age >= 40):
            fields = {"t_score": t[0], "site": t[1] or "site not recorded", "date": t[2].isoformat()}
            return Risk("low", "low by bone density", [cfg["low_with_dxa"].format(**fields)] + notes, cfg["citation"])
        return Risk("undetermined", "not yet known", [cfg["undetermined"].format(frax=frax)] + notes, cfg["citation"])

    def _gc_line(self, a: Assessment, risk: Risk) -> AdviceLine | None:
        """The ACR 2022 treatment line for the stratum, unless a line that rules out drugs applies to the patient."""
        special = self._line(a, None, only_no_drugs=True)
        if special is not None:
            return special
        text = self.gc_cfg.get("lines", {}).get(risk.level)
        return AdviceLine(f"gc_{risk.level}", text, [self.gc_cfg["citation"]]) if text else None

    # ---- the treatment line ------------------------------------------------------------------------
    def _line(self, a: Assessment, risk: Risk | None, only_no_drugs: bool = False) -> AdviceLine | None:
        for line in self.advice["lines"]:
            if only_no_drugs and not line.get("no_drug_drafts"):
                continue
            holds, fields = self._holds(line["when"], a, risk)
            if holds:
                return self._advice_line(line, a, fields)
        return None

    def _also(self, a: Assessment) -> list[AdviceLine]:
        out = []
        for line in self.advice.get("also", []):
            holds, fields = self._holds(line["when"], a, None)
            if holds:
                out.append(self._advice_line(line, a, fields))
        return out

    @staticmethod
    def _advice_line(line: dict, a: Assessment, fields: dict) -> AdviceLine:
        text = line.get("text") or line["text_male" if a.record.sex == "male" else "text_female"]
        return AdviceLine(line["id"], " ".join(text.format(**fields).split()), list(line["citations"]),
                          bool(line.get("no_drug_drafts")), line.get("short", ""), line.get("summary", ""))

    def _holds(self, when: str, a: Assessment, risk: Risk | None) -> tuple[bool, dict]:
        ctx = a.context
        if when == "always":
            return True, {}
        if when == "pregnancy_or_lactation":
            plo = any(f.cause.id == "pregnancy_lactation" and not f.suspected for f in a.findings)
            return plo or bool((ctx.pregnant or ctx.lactating) and (ctx.fractures or ctx.osteoporosis or ctx.low_bmd)), {}
        if when == "pregnant_or_lactating":
            return bool(ctx.pregnant or ctx.lactating), {}
        if when == "kidney_g4_g5":
            egfr = ctx.latest_egfr
            coded = any(e.reference != (egfr[2] if egfr else None) for e in ctx.kidney_caution)
            return coded or (egfr is not None and egfr[0] < 30), {}
        if when == "young_adult":
            return ctx.young_adult, {}
        if when == "very_high_risk":
            return risk is not None and risk.level == "very_high", {"reasons": ", ".join(risk.reasons) if risk else ""}
        if when == "phpt_surgical_criteria":
            reasons = self._phpt_criteria(a)
            return bool(reasons), {"reasons": "; ".join(reasons)}
        return False, {}

    def _phpt_criteria(self, a: Assessment) -> list[str]:
        """The Fifth International Workshop (2022) criteria for parathyroidectomy that the record shows, for primary
        hyperparathyroidism (not lithium-, thiazide-, transplant- or CKD-related)."""
        f = next((f for f in a.findings if f.cause.id == "hyperparathyroidism" and not f.suspected), None)
        if f is None or (f.variant and f.variant.get("id") != "primary"):
            return []
        w = self.advice["wording"]
        words = w["phpt_criteria"]
        rec, ctx = a.record, a.context
        since = rec.as_of - timedelta(days=365)
        out = []
        ca = rec.newest(self.cat.loinc_groups.get("calcium", []), since, valued=True)
        if ca is not None:
            upper = ca.ref_high if ca.ref_high is not None else w.get("phpt_default_calcium_upper_limit", 10.2)
            if ca.value > upper + w.get("phpt_calcium_above_upper_limit", 1.0):
                out.append(words["calcium"].format(value=ca.value))
        t = ctx.latest_t_score
        if t is not None and t[0] <= -2.5:
            out.append(words["t_score"].format(value=t[0]))
        if any(fr.site == "vertebra" for fr in ctx.fractures):
            out.append(words["vertebral_fracture"])
        if ctx.latest_egfr and ctx.latest_egfr[0] < w.get("phpt_egfr_below", 60):
            out.append(words["egfr"].format(value=ctx.latest_egfr[0]))
        if ctx.sections.get("kidney_stones"):
            out.append(words["kidney_stones"])
        urine = rec.newest(self.cat.loinc_groups.get("urine_calcium_24h", []), since, valued=True)
        limit = (w.get("phpt_urine_calcium_above") or {}).get(rec.sex or "", None)
        if urine is not None and limit is not None and urine.value > limit:
            out.append(words["urine_calcium"].format(value=urine.value))
        if rec.age is not None and rec.age < w.get("phpt_age_below", 50):
            out.append(words["age"].format(age=rec.age))
        return out

    # ---- therapy alerts and the next decision ---------------------------------------------------------
    def _fractures_on_therapy(self, a: Assessment) -> list[tuple[Course, list]]:
        """(course, fractures) for each course with a fragility fracture dated at least fracture_on_therapy_after_days
        after it began and while it ran, for courses current now or ended within a year."""
        after = timedelta(days=self.therapy_cfg["fracture_on_therapy_after_days"])
        out = []
        for c in a.context.therapy.courses:
            if c.state != CURRENT and (a.as_of - c.last).days > 365:
                continue
            end = a.as_of if c.state == CURRENT else c.last + timedelta(days=c.cls.get("residual_effect_days", 0) or 30)
            hits = [f for f in a.context.fractures if f.when and c.start + after <= f.when <= end]
            if hits:
                out.append((c, hits))
        return out

    def _alerts(self, a: Assessment) -> list[TherapyAlert]:
        ctx, as_of = a.context, a.as_of
        words = self.therapy_cfg["wording"]
        out = []
        for c in ctx.therapy.courses:
            if c.state == OVERDUE:
                fields = {"last": c.last.isoformat(), "due": c.next_due.isoformat(),
                          "months": round((as_of - c.last).days / 30.44)}
                out.append(TherapyAlert("denosumab_overdue", words["denosumab_overdue"]["summary"].format(**fields),
                                        " ".join(words["denosumab_overdue"]["detail"].format(**fields).split()),
                                        list(c.cls.get("citations", [])), c.references))
        anabolic = self.engine.bone.unfollowed_anabolic(ctx.therapy, as_of)
        if anabolic is not None:
            fields = {"drug": anabolic.drug.capitalize(), "start": anabolic.start.isoformat(),
                      "end": anabolic.last.isoformat()}
            out.append(TherapyAlert("anabolic_no_follow_on", words["anabolic_no_follow_on"]["summary"].format(**fields),
                                    " ".join(words["anabolic_no_follow_on"]["detail"].format(**fields).split()),
                                    list(anabolic.cls.get("citations", [])), anabolic.references))
        for c, fractures in self._fractures_on_therapy(a)[:1]:
            fields = {"drug": c.drug, "since": c.start.isoformat()[:7],
                      "fractures": "; ".join(f.text for f in fractures[:2])}
            out.append(TherapyAlert("treatment_failure", words["treatment_failure"]["summary"].format(**fields),
                                    " ".join(words["treatment_failure"]["detail"].format(**fields).split()),
                                    list(self.therapy_cfg.get("failure_citations", [])),
                                    c.references[:1] + [f.reference for f in fractures]))
        return out

    def _next_decision(self, a: Assessment, plan: CarePlan) -> str | None:
        """For a current course: the next denosumab dose; or, after the years ASBMR 2016 names, a drug-holiday review,
        unless high-risk features say continue. Never a drug holiday after a fracture on therapy."""
        words = self.therapy_cfg["wording"]
        as_of = a.as_of
        for c in a.context.courses:
            if c.state != CURRENT:
                continue
            if c.class_id == "denosumab" and c.next_due:
                return words["denosumab_next"]["text"].format(due=c.next_due.isoformat())
            review = c.cls.get("holiday_review_years")
            years = c.years(as_of)
            if not review or years < review:
                continue
            if any(alert.kind == "treatment_failure" for alert in plan.alerts):
                return None                          # the alert says what to do: never a holiday
            reasons = self._high_risk_features(a, plan)
            if reasons:
                limit = c.cls.get("high_risk_continue_years", review)
                if years < limit:
                    return words["high_risk_continue"]["text"].format(years=years, label=c.cls["label"],
                                                                       reasons=reasons[0], limit=limit)
            return words["holiday_review"]["text"].format(years=years, label=c.cls["label"])
        return None

    @staticmethod
    def _high_risk_features(a: Assessment, plan: CarePlan) -> list[str]:
        """ASBMR 2016: a T-score at or below -2.5, a hip or vertebral fracture (before or on therapy), very high risk,
        ongoing glucocorticoids."""
        ctx = a.context
        out = []
        if ctx.latest_t_score and ctx.latest_t_score[0] <= -2.5:
            out.append(f"T-score {ctx.latest_t_score[0]:.1f}")
        if any(f.major for f in ctx.fractures):
            out.append("a hip or vertebral fracture")
        if plan.risk and plan.risk.level == "very_high" and not out:
            out += plan.risk.reasons[:1]
        if any(f.cause.id == "glucocorticoids" and not f.suspected for f in a.findings):
            out.append("long-term glucocorticoids")
        return out

    def _screening(self, a: Assessment) -> bool:
        """Several contributors listed (none firing alone) in a woman from 65 or a man from 70 (BHOF 2022 screening
        ages) with no DXA on record: an info card asking for DXA and FRAX."""
        cfg = self.advice.get("screening")
        ctx, rec = a.context, a.record
        if not cfg or ctx.last_dxa is not None or ctx.treated or ctx.latest_t_score is not None:
            return False
        min_age = (cfg.get("ages") or {}).get(rec.sex or "")
        if min_age is None or rec.age is None or rec.age < min_age:
            return False
        listed = [f for f in a.findings if not f.fires_alone and not f.suspected]
        return len(listed) >= cfg.get("min_listed", 2)

