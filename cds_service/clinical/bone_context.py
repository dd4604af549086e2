"""The bone-health context of a record: osteoporosis and fractures as charts record them, the latest DXA scores,
the workup already done, kidney function, pregnancy, and osteoporosis therapy read as a history."""
from __future__ import annotations

from datetime import date, timedelta
from functools import lru_cache
from operator import attrgetter

from ..knowledge.catalog import CPT, ICD10CM, SNOMED, Catalog, icd_key, icd_prefix_match, normalize_system, words_regex
from ..fhir.record import CodedEntry, PatientRecord
from .assessment import BoneContext, Evidence, Fracture
from .rules.results import VALUE
from .therapy import OVERDUE, Course, TherapyHistory, TherapyReader


class BoneContextReader:
    """Reads a record's BoneContext; the catalog's code sets for it are gathered once."""

    def __init__(self, catalog: Catalog, therapy: TherapyReader):
        self.cat = catalog
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
        self.therapy = therapy

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
        return Fracture(c.reference, coded_text(c), c.fracture_site, bool(spec.get("major")), c.when, osteoporotic)

    def _bone_groups_of_code(self, system: str, code: str) -> tuple[str, ...]:
        return tuple(g for g, (exact, prefixes) in self.bone_groups.items()
                     if code in exact or (system == ICD10CM and icd_prefix_match(code, prefixes)))

    def read(self, rec: PatientRecord) -> BoneContext:
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
                    ev = Evidence(c.reference, coded_text(c))
                    ctx.bone_diagnoses.append(ev)
                    if "osteoporosis" in groups and not c.historic and not c.suspected:
                        ctx.osteoporosis.append(ev)
            if c.historic or c.suspected:
                continue
            if c.resource_type == "Condition" and any(code in self.treatment_codes for _, code in c.codes):
                ctx.treatments.append(Evidence(c.reference, coded_text(c)))
            for section in c.sections:
                if section == "kidney_caution":
                    if c.resource_type == "Condition" or (c.when and self.dialysis_since(rec) <= c.when <= rec.as_of):
                        ctx.kidney_caution.append(Evidence(c.reference, coded_text(c)))
                    continue
                within = det.get(section, {}).get("within_days")
                if within and c.resource_type == "Condition" and (c.when is None or c.when < rec.as_of - timedelta(days=within)):
                    continue          # an old pregnancy or hospice code left open
                if within and c.resource_type == "Procedure" and (c.when is None or not
                                                                  rec.as_of - timedelta(days=within) <= c.when <= rec.as_of):
                    continue
                ctx.sections.setdefault(section, []).append(Evidence(c.reference, coded_text(c)))
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


def coded_text(entry: CodedEntry, copies: int = 1, last: date | None = None) -> str:
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
