"""Findings: which catalog causes the patient record shows, with the evidence for each.

The engine reads rules and thresholds from the catalog; "today" is always the `as_of` date it is
given, so fixtures and tests do not rot.
"""
from __future__ import annotations

from datetime import date, timedelta

from ..knowledge.catalog import Catalog, Cause
from ..fhir.record import PatientRecord
from .assessment import Assessment, BoneContext, Finding
from .care import CarePlanner
from .bone_context import BoneContextReader
from .rules import result_evidence
from .rules.condition_match import coded_evidence
from .rules.medication_exposure import MedicationExposureRule
from .rules.smoking import newer_status_overrides
from .therapy import TherapyReader


_STRENGTH_ORDER = {"strong": 0, "moderate": 1, "weak": 2}

# rule keys whose results are read only within the rule's lookback_days
_WINDOWED_KEYS = ("loinc", "calcium_loinc", "pth_loinc", "albumin_loinc", "weight_loinc", "creatinine_loinc")


# the numbers shown on every card (label, LOINC group, format); read back scope.latest_results_days
LATEST_RESULTS = (("eGFR", "egfr", "{:.0f}"), ("calcium", "calcium", "{:.1f} mg/dL"),
                  ("25-OH vitamin D", "vitamin_d", "{:.0f} ng/mL"), ("ALP", "alp", "{:.0f} U/L"))


def observation_windows(catalog: Catalog) -> dict[str, int | None]:
    """How many days back the engine reads results of each LOINC code; None where it may read
    any result, however old. The record builder leaves older results out, so this must mirror
    every read below: rule lookbacks, the DXA and workup context, and the reads with no window
    (height, the smoking-status override, `skip_if_any_loinc`)."""
    windows: dict[str, int | None] = {}

    def read(code: str, days: int | None) -> None:
        if days is None or windows.get(code, 0) is None:
            windows[code] = None
        else:
            windows[code] = max(days, windows.get(code, 0))

    for rule in catalog.observation_rules.values():
        lookback = rule.get("lookback_days", 365)
        for key in _WINDOWED_KEYS:
            for code in rule.get(key, ()):
                read(code, None if (key == "loinc" and rule["kind"] == "smoking") else lookback)
        for code in rule.get("height_loinc", ()):
            read(code, None)
        for code in rule.get("skip_if_any_loinc", ()):
            read(code, None)
    s = catalog.settings
    det = catalog.detection
    for k in ("t_score", "z_score", "bmd_area_density", "study", "frax"):
        for c in det["existing_dxa"].get(k, []):
            # the latest T-score is read however old (untreated osteoporosis); the rest for DXA recency
            read(c["code"], None if k == "t_score" else s.get("recent_dxa_days", 730))
    for tier in det["workup"].values():
        for item in tier:
            for c in item["codes"]:
                read(c["code"], s.get("recent_workup_days", 365))
    for _, group, _ in LATEST_RESULTS:
        for code in catalog.loinc_groups.get(group, []):
            read(code, s.get("latest_results_days", 730))
    for groups in det.get("workup_policy", {}).get("key_components", {}).values():
        for group in groups:
            for code in group:
                read(code, s.get("recent_workup_days", 365))
    return windows


def quiet_indicator(settings: dict) -> bool:
    """`info` by default and `warning` only where the causes' policy.quiet.warning says (the quiet firing
    policy implies it)."""
    return settings.get("indicator_policy", "standard") == "quiet" or settings.get("firing_policy") == "quiet"


class Engine:
    """Evaluates one PatientRecord against the catalog, as orchestration: read the bone context
    (bone_context.py), find the causes something in the record points to, run each cause's rules (its codes here,
    its medication exposure and result rules from rules/), apply the firing policy, then plan care (care.py)."""

    def __init__(self, catalog: Catalog):
        self.cat = catalog
        # causes whose lab/vital rules run on any record that has a result for one of their codes
        self.obs_causes: dict[str, set[str]] = {}
        for cause in catalog.causes.values():
            for rid in cause.detect.get("observations", []):
                rule = catalog.observation_rules[rid]
                for key in ("loinc", "calcium_loinc", "pth_loinc"):
                    for code in rule.get(key, []):
                        self.obs_causes.setdefault(code, set()).add(cause.id)
        self.therapy = TherapyReader(catalog)
        self.bone = BoneContextReader(catalog, self.therapy)
        self.medication_rule = MedicationExposureRule(catalog)
        self.planner = CarePlanner(catalog, self)

    # ------------------------------------------------------------------------------------------
    def assess(self, record: PatientRecord) -> Assessment:
        """Evaluate, then validate (fhir.resources) only the resources the result rests on.

        A cited resource that fails validation is dropped and counted, and the record is
        evaluated again without it, so nothing invalid ever reaches a card.
        """
        while True:
            assessment = self.evaluate(record)
            invalid = {ref for ref in assessment.cited_references() if not record.validate(ref)}
            if not invalid:
                return assessment
            record.without(invalid)

    def evaluate(self, record: PatientRecord) -> Assessment:
        age = record.age
        min_age = self.cat.settings.get("min_age_years", 18)
        in_scope = age is None or age >= min_age
        context = self.bone.read(record)
        findings: list[Finding] = []
        if in_scope:
            candidates = record.cause_candidates(self.obs_causes)   # causes something in the record points to
            for cause in self.cat.causes.values():
                if cause.id not in candidates:
                    continue
                finding = self._detect(cause, record, context)
                if finding:
                    findings.append(finding)
            found = {f.cause.id for f in findings if not f.suspected}     # a suspected myeloma replaces no MGUS
            findings = [f for f in findings if not found.intersection(f.cause.not_with)]
            for f in findings:
                self._apply_policy(f, record, context, found)
                f.variant = self._variant(f, record, context, found)
            if context.courses and findings:
                dates = _dates_by_reference(record)
                for f in findings:
                    f.first_seen = min((dates[r] for r in f.references if r in dates), default=None)
        findings.sort(key=lambda f: (not f.fires_alone, _STRENGTH_ORDER[f.cause.strength],
                                     f.tier != "very_high", f.cause.id))
        assessment = Assessment(record.patient_id, record.as_of, in_scope, findings, context, record)
        if in_scope:
            assessment.care = self.planner.plan(assessment)
        return assessment

    def _apply_policy(self, f: Finding, rec: PatientRecord, ctx: BoneContext, found: set[str]) -> None:
        """Whether the finding fires the card on its own, and (quiet policy) whether it makes it a warning."""
        f.fires_alone = f.cause.fires_alone and not f.suspected
        if f.suspected:
            return
        q = f.cause.quiet
        if not q:
            return
        if self.cat.settings.get("firing_policy", "standard") == "quiet":
            f.fires_alone = self._fires_alone_quietly(f, q, rec, ctx, found)
        if quiet_indicator(self.cat.settings):
            when = q.get("warning")
            f.warning = f.fires_alone and (
                when == "always"
                or (when == "no_recent_dxa" and (ctx.last_dxa is None or ctx.treatment_gap or f.tier == "very_high"))
                or (when == "bone_treatment_context" and bool(ctx.kidney_caution)
                    and (ctx.treatment_gap or bool(ctx.treatments))))

    def _variant(self, f: Finding, rec: PatientRecord, ctx: BoneContext, found: set[str]) -> dict | None:
        """The cause's variant that fits this patient (causes.yaml `variants`, first whose `when` holds)."""
        for v in f.cause.variants:
            w = v["when"]
            if w.get("with_causes") and not found.intersection(w["with_causes"]):
                continue
            if w.get("with_context_medications") and not any(
                    m.ongoing or (m.end and m.end >= rec.as_of - timedelta(days=90))
                    for name in w["with_context_medications"] for m in rec.medications_by_cause.get(f"context:{name}", ())):
                continue
            if w.get("kidney_g4_g5") and not (any(e.reference != (ctx.latest_egfr or (0, 0, None))[2]
                                                  for e in ctx.kidney_caution)
                                              or (ctx.latest_egfr and ctx.latest_egfr[0] < 30)):
                continue
            if "coded" in w and f.coded != w["coded"]:
                continue
            if w.get("sex") and rec.sex != w["sex"]:
                continue
            if w.get("lab_results_at_most") and (f.coded or f.cause.medication_rule and any(
                    e.reference.startswith("Medication") for e in f.evidence)
                                                 or len(f.evidence) > w["lab_results_at_most"]):
                continue
            return v
        return None

    def _fires_alone_quietly(self, f: Finding, q: dict, rec: PatientRecord, ctx: BoneContext, found: set[str]) -> bool:
        """The quiet firing policy: whether this cause fires the card on its own for this patient."""
        rule = q.get("fires_alone", True)
        if rule == "from_age":
            min_age = self.cat.settings.get("quiet_min_age_years", 50)
            rule = (rec.age is not None and rec.age >= min_age) or "premature_menopause" in found
        if not rule and q.get("unless") == "codes":
            rule = f.coded
        if not rule and q.get("unless") == "kidney_caution":
            rule = bool(ctx.kidney_caution)
        if not rule and q.get("unless_ingredients"):
            refs = set(f.references)
            rule = any(i.name in q["unless_ingredients"] for m in rec.medications_by_cause.get(f.cause.id, ())
                       if m.reference in refs for i in m.ingredients)
        return bool(rule)

    # ------------------------------------------------------------------------------------------
    def _detect(self, cause: Cause, rec: PatientRecord, ctx: BoneContext) -> Finding | None:
        detect = cause.detect
        pat = detect.get("patient") or {}
        if pat.get("sex") and rec.sex != pat["sex"]:
            return None
        if pat.get("max_age") is not None and (rec.age is None or rec.age > pat["max_age"]):
            return None
        evidence, supporting, suspected = coded_evidence(cause, rec, self.cat)
        citations: list[str] = []
        tier = None
        coded = bool(evidence)
        if evidence:
            citations.append(cause.citations[0])
        med = cause.medication_rule
        if med:
            med_ev, med_tier, med_cites = self.medication_rule.evaluate(cause, med, rec, ctx)
            if med_ev:
                evidence += med_ev
                tier = tier or med_tier
                citations += med_cites
        unless = detect.get("observations_unless_on_medication_of")
        if detect.get("observations") and not (unless and self.medication_rule.currently_on(unless, rec)):
            for rid in detect["observations"]:
                obs_ev = result_evidence(self.cat.observation_rules[rid], rec)
                if obs_ev:
                    evidence += obs_ev
                    citations += self.cat.observation_rules[rid].get("citations", [])[:1]
        if evidence and cause.id == "smoking":
            evidence = newer_status_overrides(evidence, rec, self.cat)
        only_suspected = not evidence and bool(suspected)
        if only_suspected:
            evidence, citations = suspected, cause.citations[:1]    # listed as suspected, never firing on its own
        if not evidence:
            return None
        req = detect.get("requires") or {}
        if req.get("fragility_fracture_within_days"):
            since = rec.as_of - timedelta(days=req["fragility_fracture_within_days"])
            if not any(f.when and f.when >= since for f in ctx.fractures):
                return None
        return Finding(cause, evidence, list(dict.fromkeys(citations or cause.citations[:1])), tier, supporting,
                       coded=coded, suspected=only_suspected)







    # ---- observations ------------------------------------------------------------------------














def _dates_by_reference(rec: PatientRecord) -> dict[str, date]:
    """When each record the engine read begins: onset, start of use, date of a result."""
    out: dict[str, date] = {}
    for c in rec.conditions + rec.procedures:
        if c.when:
            out[c.reference] = c.when
    for m in rec.medications:
        if m.start:
            out[m.reference] = m.start
    for results in rec.observations.values():
        for m in results:
            out.setdefault(m.reference, m.when)
    return out


