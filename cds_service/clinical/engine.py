"""Findings: which catalog causes the patient record shows, with the evidence for each.

The engine reads rules and thresholds from the catalog; "today" is always the `as_of` date it is
given, so fixtures and tests do not rot.
"""
from __future__ import annotations

from datetime import date, timedelta
from functools import lru_cache
from operator import attrgetter

from ..knowledge.catalog import CPT, ICD10CM, SNOMED, Catalog, Cause, icd_key, icd_prefix_match, normalize_system, words_regex
from ..fhir.record import CodedEntry, MedicationExposure, PatientRecord, num
from .assessment import Assessment, BoneContext, Evidence, Finding, Fracture
from .care import CarePlanner
from .rules import result_evidence
from .rules.persistent_result import persistent_run
from .rules.results import VALUE
from .rules.smoking import smoking_current
from .therapy import OVERDUE, Course, TherapyHistory, TherapyReader


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
    """Evaluates one PatientRecord against the catalog."""

    def __init__(self, catalog: Catalog):
        self.cat = catalog
        self.gc = catalog.medication_settings["glucocorticoids"]
        det = catalog.detection
        # osteoporosis, osteopenia and fragility-fracture codes per group (exact, or ICD-10-CM prefixes)
        self.bone_groups: dict[str, tuple[set[str], set[str]]] = {}
        for group in ("osteoporosis", "osteopenia", "fragility_fracture_history"):
            codes = catalog.index_codes(group)
            self.bone_groups[group] = ({c["code"] for c in codes if c.get("match") != "prefix"},
                                       {icd_key(c["code"]) for c in codes if c.get("match") == "prefix"})
        self._bone_groups_of = lru_cache(maxsize=4096)(self._bone_groups_of_code)   # the same codes on every chart
        self.t_score_loincs = {c["code"] for c in det["existing_dxa"].get("t_score", [])}
        self.frax_loincs = [c["code"] for c in det["existing_dxa"].get("frax", []) if c.get("verified")
                            and "major" in c.get("display", "").lower()]
        self.t_score_names = {c["code"]: c.get("display", "") for c in det["existing_dxa"].get("t_score", [])}
        self.egfr_loincs = catalog.loinc_groups.get("egfr", [])
        self.dxa_loincs = {c["code"] for k in ("t_score", "z_score", "bmd_area_density", "study")
                           for c in det["existing_dxa"].get(k, [])}
        self.dxa_proc_codes = {c["code"] for k in ("procedure_cpt", "procedure_snomed")
                               for c in det["existing_dxa"].get(k, [])}
        # causes whose lab/vital rules run on any record that has a result for one of their codes
        self.obs_causes: dict[str, set[str]] = {}
        for cause in catalog.causes.values():
            for rid in cause.detect.get("observations", []):
                rule = catalog.observation_rules[rid]
                for key in ("loinc", "calcium_loinc", "pth_loinc"):
                    for code in rule.get(key, []):
                        self.obs_causes.setdefault(code, set()).add(cause.id)
        # (workup item, label, code) in catalog order: a test resulted recently is not offered again
        self.workup_codes = [(item["id"], item["label"], c["code"]) for tier in det["workup"].values()
                             for item in tier for c in item["codes"]]
        # panels done only when each key component was resulted (a CMP with only a glucose is not done)
        self.key_components = {wid: [list(g) for g in groups]
                               for wid, groups in det.get("workup_policy", {}).get("key_components", {}).items()}
        self.panel_codes = {item["id"]: list(item["order"]) for tier in det["workup"].values() for item in tier}
        self.workup_labels = {item["id"]: item["label"] for tier in det["workup"].values() for item in tier}
        self.treatment_codes = {c["code"] for c in det["osteoporosis_treatment"]["other_codes"]
                                if normalize_system(c["system"]) in (ICD10CM, SNOMED)}
        self.z_score_loincs = {c["code"] for c in det["existing_dxa"].get("z_score", [])}
        self.z_score_names = {c["code"]: c.get("display", "") for c in det["existing_dxa"].get("z_score", [])}
        fr = det.get("fractures", {})
        self.fracture_spec = fr.get("sites", {})
        self.fracture_min_onset_age = fr.get("min_age_at_onset", 50)
        self.high_energy_days = fr.get("high_energy_within_days", 3)
        self.osteoporotic_words = words_regex(fr.get("osteoporotic_words", []))
        self.therapy = TherapyReader(catalog)
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
        context = self._context(record)
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
        evidence: list[Evidence] = []
        supporting: list[Evidence] = []
        citations: list[str] = []
        tier = None
        entries = rec.coded_by_cause.get(cause.id, ())
        if entries and detect.get("evidence_age"):
            # a procedure that is evidence only while recent (dialysis, chemotherapy); undated: not shown recent
            since = rec.as_of - timedelta(days=detect["evidence_age"]["procedures_within_days"])
            entries = [e for e in entries if e.resource_type != "Procedure" or (e.when is not None and e.when >= since)]
        if entries and detect.get("codes_refuted_by"):
            entries = self._not_refuted(entries, detect["codes_refuted_by"], rec)
        suspected: list[Evidence] = []
        for group in _same_concept(entries):
            roles = {role for e in group for cid, role in e.matches if cid == cause.id}
            ev = Evidence(group[0].reference, _coded_text(group[0], len(group), group[-1].when),
                          tuple(e.reference for e in group[1:]))
            if group[0].suspected:
                (suspected if "trigger" in roles else supporting).append(ev)
            else:
                (evidence if "trigger" in roles else supporting).append(ev)
        coded = bool(evidence)
        if evidence:
            citations.append(cause.citations[0])
        med = cause.medication_rule
        if med:
            med_ev, med_tier, med_cites = self._medication_rule(cause, med, rec, ctx)
            if med_ev:
                evidence += med_ev
                tier = tier or med_tier
                citations += med_cites
        unless = detect.get("observations_unless_on_medication_of")
        if detect.get("observations") and not (unless and self._currently_on(unless, rec)):
            for rid in detect["observations"]:
                obs_ev = self._observation_rule(self.cat.observation_rules[rid], rec)
                if obs_ev:
                    evidence += obs_ev
                    citations += self.cat.observation_rules[rid].get("citations", [])[:1]
        if evidence and cause.id == "smoking":
            evidence = self._smoking_override(evidence, rec)
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

    def _not_refuted(self, entries, rule_id: str, rec: PatientRecord) -> list[CodedEntry]:
        """Coded entries that later results do not refute: a CKD code recorded before a run of normal
        eGFR (after a transplant, or an old code never abated) no longer describes the patient."""
        rule = self.cat.observation_rules[rule_id]
        run = persistent_run(rule, rec, rec.as_of - timedelta(days=rule.get("lookback_days", 365)))
        if not run:
            return list(entries)
        return [e for e in entries if e.when is not None and e.when >= run[0].when]

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

    def _currently_on(self, cause_id: str, rec: PatientRecord) -> bool:
        cause = self.cat.causes[cause_id]
        return bool(self._current(self._exposures(cause, cause.medication_rule or {}, rec), rec))

    def _medication_rule(self, cause: Cause, med: dict, rec: PatientRecord,
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
            lab = self._observation_rule(self.cat.observation_rules[med["requires_observation"]], rec)
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

    # ---- observations ------------------------------------------------------------------------
    def _observation_rule(self, rule: dict, rec: PatientRecord) -> list[Evidence]:
        return result_evidence(rule, rec)

    def _smoking_override(self, evidence: list[Evidence], rec: PatientRecord) -> list[Evidence]:
        rule = next(r for r in self.cat.observation_rules.values() if r["kind"] == "smoking")
        if not rule.get("newer_status_overrides_codes"):
            return evidence
        results = rec.results(rule["loinc"])
        if results and not smoking_current(results[0], rule):
            newest = results[0].when
            coded = {c.reference: c for c in rec.conditions}
            evidence = [e for e in evidence if not (e.reference in coded and (coded[e.reference].when or date.min) <= newest)]
        return evidence

    # ---- bone-health context -----------------------------------------------------------------
    def _scores(self, rec: PatientRecord, loincs: set[str], names: dict[str, str]) -> tuple | None:
        """(lowest value, site, date, reference) of the latest DXA's scores (every site measured that day), however old."""
        results = [m for m in rec.results(loincs) if m.when <= rec.as_of and m.value is not None]
        if not results:
            return None
        day = results[0].when
        lowest = min((m for m in results if m.when == day), key=VALUE)
        site = names.get(lowest.code, "").replace("[T-score]", "").replace("[Z-score]", "") \
            .replace("Bone density", "").strip()
        return lowest.value, site, day, lowest.reference

    def _fracture(self, c: CodedEntry, rec: PatientRecord, reproductive: bool = False) -> Fracture | None:
        """A fragility fracture: a fracture site from the age the catalog says (earlier ones are trauma), or a code that
        says osteoporotic at any age; never one the record calls high-energy (its text, or a transport accident that day)."""
        if c.fracture_site is None:
            return None
        osteoporotic = self.cat.osteoporotic_fracture_codes.any_of(c.codes) or (
            c.as_text and self.osteoporotic_words.search(c.text.lower()) is not None)
        if not osteoporotic:
            age = rec.age_on(c.when) if c.when else None
            if age is None or (age < self.fracture_min_onset_age and not reproductive):
                return None
            if c.high_energy or (c.when and any(abs((c.when - d).days) <= self.high_energy_days
                                                for d in rec.transport_accident_dates)):
                return None
        spec = self.fracture_spec.get(c.fracture_site, {})
        return Fracture(c.reference, _coded_text(c), c.fracture_site, bool(spec.get("major")), c.when, osteoporotic)

    def _bone_groups_of_code(self, system: str, code: str) -> tuple[str, ...]:
        return tuple(g for g, (exact, prefixes) in self.bone_groups.items()
                     if code in exact or (system == ICD10CM and icd_prefix_match(code, prefixes)))

    def _context(self, rec: PatientRecord) -> BoneContext:
        ctx = BoneContext()
        s = self.cat.settings
        det = self.cat.detection
        ctx.deceased = rec.deceased
        # a fracture before 50 is trauma, except in pregnancy or lactation (pregnancy- and lactation-associated
        # osteoporosis presents as vertebral fractures in young women)
        reproductive = any(s in ("pregnancy", "lactation") and not c.historic and not c.suspected
                           for c in rec.conditions for s in c.sections)
        for c in rec.conditions + rec.procedures:
            fracture = self._fracture(c, rec, reproductive)
            if fracture is not None:
                ctx.fractures.append(fracture)
                ctx.bone_diagnoses.append(Evidence(c.reference, fracture.text))
            if c.resource_type == "Condition":
                groups = {g for system, code in c.codes for g in self._bone_groups_of(system, code)}
                if groups and fracture is None and "fragility_fracture_history" not in groups:
                    ev = Evidence(c.reference, _coded_text(c))
                    ctx.bone_diagnoses.append(ev)
                    if "osteoporosis" in groups and not c.historic and not c.suspected:
                        ctx.osteoporosis.append(ev)
            if c.historic or c.suspected:
                continue
            if c.resource_type == "Condition" and any(code in self.treatment_codes for _, code in c.codes):
                ctx.treatments.append(Evidence(c.reference, _coded_text(c)))
            for section in c.sections:
                if section == "kidney_caution":
                    if c.resource_type == "Condition" or (c.when and self.dialysis_since(rec) <= c.when <= rec.as_of):
                        ctx.kidney_caution.append(Evidence(c.reference, _coded_text(c)))
                    continue
                within = det.get(section, {}).get("within_days")
                if within and c.resource_type == "Condition" and (c.when is None or c.when < rec.as_of - timedelta(days=within)):
                    continue          # an old pregnancy or hospice code left open
                if within and c.resource_type == "Procedure" and (c.when is None or not
                                                                  rec.as_of - timedelta(days=within) <= c.when <= rec.as_of):
                    continue
                ctx.sections.setdefault(section, []).append(Evidence(c.reference, _coded_text(c)))
        ctx.pregnant = (ctx.sections.get("pregnancy") or [None])[0]
        ctx.lactating = (ctx.sections.get("lactation") or [None])[0]
        ctx.end_of_life = (ctx.sections.get("end_of_life") or [None])[0]
        kc = det.get("kidney_caution", {})
        egfr_since = rec.as_of - timedelta(days=kc.get("egfr_lookback_days", 730))
        egfr = rec.newest(self.egfr_loincs, egfr_since, valued=True)
        if egfr is not None:
            ctx.latest_egfr = (egfr.value, egfr.when, egfr.reference)
            if "egfr_below" in kc and egfr.value < kc["egfr_below"]:
                how = f" ({egfr.computed_from})" if egfr.computed_from else ""
                ctx.kidney_caution.insert(0, Evidence(egfr.reference, f"eGFR {egfr.value:.0f} mL/min/1.73 m2 on "
                                                                      f"{egfr.when.isoformat()}{how}"))
        ctx.kidney_caution = list({e.reference: e for e in ctx.kidney_caution}.values())
        # young adults are read by Z-score (ISCD 2023): a premenopausal woman, a man under 50
        age = rec.age
        max_age = self.cat.therapy["advice"].get("young_adult_max_age", 49)
        ctx.young_adult = age is not None and age <= max_age and (
            rec.sex == "male" or (rec.sex == "female" and not ctx.sections.get("menopause")))
        t = self._scores(rec, self.t_score_loincs, self.t_score_names)
        if t is not None:
            value, site, day, ref = t
            ctx.latest_t_score = (value, site, day)
            if value <= det.get("treatment_gap", {}).get("t_score_at_most", -2.5) and not ctx.young_adult:
                ctx.low_t_score = Evidence(ref, f"T-score {value:.1f} ({site}) on {day.isoformat()}")
        z = self._scores(rec, self.z_score_loincs, self.z_score_names)
        if z is not None:
            value, site, day, ref = z
            ctx.latest_z_score = (value, site, day)
            if ctx.young_adult and value <= self.cat.therapy["advice"].get("z_score_at_most", -2.0):
                ctx.low_z_score = Evidence(ref, f"Z-score {value:.1f} ({site}) on {day.isoformat()}: low for age")
        # a fracture at a site other than hip or spine, with a normal T-score: not osteoporosis by itself
        normal_above = det.get("fractures", {}).get("normal_t_score_above", -1.0)
        if ctx.latest_t_score and ctx.latest_t_score[0] > normal_above and not ctx.young_adult:
            ctx.normal_bmd_fractures = [f for f in ctx.fractures if not f.major and not f.osteoporotic]
        dxa_since = rec.as_of - timedelta(days=s.get("recent_dxa_days", 730))
        candidates: list[tuple[date, Evidence]] = []
        for code in self.dxa_loincs:
            for m in rec.observations.get(code, ()):
                if dxa_since <= m.when <= rec.as_of:
                    candidates.append((m.when, Evidence(m.reference, f"DXA result on {m.when.isoformat()}")))
        for p in rec.procedures:
            if p.when and dxa_since <= p.when <= rec.as_of and any(code in self.dxa_proc_codes for _, code in p.codes):
                candidates.append((p.when, Evidence(p.reference, f"DXA on {p.when.isoformat()}")))
        if candidates:
            ctx.last_dxa, ctx.dxa_evidence = max(candidates, key=lambda x: x[0])
        frax = rec.newest(self.frax_loincs, dxa_since, valued=True)
        if frax is not None:
            ctx.latest_frax = (frax.value, frax.when)
        # osteoporosis therapy as a history (therapy.yaml)
        ctx.therapy = self.therapy.read(rec)
        ctx.treated = self.therapy.treated(ctx.therapy, rec.as_of)
        ctx.treatments += [Evidence(c.reference, self.describe_course(c, rec.as_of)) for c in ctx.courses]
        ctx.alerts_replace_gap = any(c.state == OVERDUE for c in ctx.therapy.courses) or bool(
            self.unfollowed_anabolic(ctx.therapy, rec.as_of))
        w_since = rec.as_of - timedelta(days=s.get("recent_workup_days", 365))
        for item_id, groups in self.key_components.items():
            label = self.workup_labels[item_id]
            newest = [rec.newest(codes, w_since) for codes in [self.panel_codes[item_id]] + groups]
            if newest[0] is None and all(newest[1:]):
                newest[0] = max(newest[1:], key=attrgetter("when"))
            if newest[0] is not None:
                ctx.workup_done[item_id] = Evidence(newest[0].reference, f"{label} on {newest[0].when.isoformat()}")
        for item_id, label, code in self.workup_codes:
            if item_id in ctx.workup_done or item_id in self.key_components:
                continue
            for m in rec.observations.get(code, ()):          # newest first
                if m.when <= rec.as_of:
                    if m.when >= w_since:
                        ctx.workup_done[item_id] = Evidence(m.reference, f"{label} on {m.when.isoformat()}")
                    break
        return ctx

    def dialysis_since(self, rec: PatientRecord) -> date:
        return rec.as_of - timedelta(days=self.cat.detection.get("kidney_caution", {}).get("dialysis_within_days", 90))

    def describe_course(self, c: Course, as_of: date) -> str:
        """"Alendronate 70 MG Oral Tablet, 70 mg weekly, since 2019-05 (last ordered 2021-05-03, order still active)"."""
        text = f"{c.label or c.drug}, since {c.start.isoformat()[:7]}"
        if self.therapy.stale(c, as_of):
            text += f" ({self.cat.therapy['therapy']['wording']['stale_order'].format(date=c.newest_record.isoformat())})"
        elif c.cls.get("dose_every_days"):
            text += f" (last dose {c.last.isoformat()})"
        return text

    def unfollowed_anabolic(self, history: TherapyHistory, as_of: date) -> Course | None:
        """The newest anabolic course that ended (not long ago) with no antiresorptive started after it."""
        for c in reversed(history.courses):
            cls = c.cls
            if not cls.get("anabolic") or c.state == "current":
                continue
            if (as_of - c.last).days > cls.get("follow_on_alert_days", 730):
                return None
            overlap = any(o.is_antiresorptive() and o.start <= c.last + timedelta(days=cls.get("follow_on_within_days", 90))
                          and (o.last >= c.last or o.state == "current") for o in history.courses if o is not c)
            return None if overlap else c
        return None


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


def _same_concept(entries) -> list[list[CodedEntry]]:
    """Copies of one condition or procedure (the same codes and name) grouped, oldest first: a chart that
    records it at every visit shows one line, not twenty."""
    groups: dict[tuple, list[CodedEntry]] = {}
    for e in entries:
        groups.setdefault((tuple(e.codes), e.text, e.historic, e.as_text, e.suspected), []).append(e)
    return [sorted(g, key=lambda e: e.when or date.min) for g in groups.values()]


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


def _coded_text(entry: CodedEntry, copies: int = 1, last: date | None = None) -> str:
    """A condition or procedure in words and dates; its codes stay in --explain."""
    how = " (suspected: rule-out or provisional)" if entry.suspected else " (recorded as text, no code we know)" if entry.as_text else ""
    when = f", {'onset' if entry.resource_type == 'Condition' else 'performed'} {entry.when.isoformat()}" if entry.when else ""
    healed = ", recorded as resolved (history)" if entry.historic else ""
    again = f"; recorded {copies} times, last {last.isoformat()}" if copies > 1 and last else \
        f"; recorded {copies} times" if copies > 1 else ""
    return f"{entry.text or _coded_name(entry)}{how}{when}{healed}{again}"


def _coded_name(entry: CodedEntry) -> str:
    """An entry with no name recorded: named by its code (the only words it has)."""
    return ", ".join(f"{_system_name(s)} {c}" for s, c in entry.codes[:1]) or "coded entry"


def _system_name(system: str) -> str:
    return {ICD10CM: "ICD-10-CM", SNOMED: "SNOMED", CPT: "CPT"}.get(system, system.rsplit("/", 1)[-1])


