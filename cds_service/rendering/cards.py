"""Turns an Assessment into the one CDS Hooks card (or none), using the wording in cards/card.yaml."""
from __future__ import annotations

import re
import uuid
from functools import lru_cache
from datetime import timedelta
from types import SimpleNamespace
from typing import Callable

from ..knowledge.catalog import Catalog
from ..clinical.assessment import Assessment, Finding
from ..clinical.engine import LATEST_RESULTS, quiet_indicator

_MD_SPECIAL = "\\`*_{}[]<>()#+!|~&"           # backslash first, so escapes are not escaped again
# A word GFM renderers would turn into a link on their own (remark-gfm finds bare URLs, www. names and
# e-mail addresses in the text after escapes are resolved, so escaping cannot stop it): shown as code.
_LIST_START = re.compile(r"^(\d{1,9}|)([.)-])(?= |$)")
# what a renderer might link by itself: a scheme, www., an e-mail address, a protocol-relative //host, or a bare
# domain ("evil.example", "EVIL.COM/login": linkify's fuzzy links)
_LINKISH = re.compile(r"(?i)(?:https?|ftp|mailto|xmpp):|www\.|@|//|[a-z0-9-]\.[a-z]{2,}")
# zero-width and bidirectional controls: "w\u200bww.evil" reads as a link to a person and hides from the checks above;
# a right-to-left override reverses what follows. Never part of chart text a clinician needs.
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
LONGEST_WORD = 60               # a longer word is broken (a 20,000-character word would stretch the card)


@lru_cache(maxsize=8192)
def md(text: str) -> str:
    """Chart text for a Markdown card, shown as recorded in CommonMark and GFM renderers (remark-gfm,
    cmark-gfm, markdown-it): punctuation that could start a link, HTML, an entity or formatting is
    escaped, and a word a renderer would link by itself (a URL, www. name or e-mail address) is set
    as code, which no renderer links or reinterprets."""
    words = " ".join(_INVISIBLE.sub("", str(text)).split())
    if len(words) > LONGEST_WORD and any(len(w) > LONGEST_WORD for w in words.split(" ")):
        words = " ".join(w[i:i + LONGEST_WORD] for w in words.split(" ") for i in range(0, len(w), LONGEST_WORD))
    if _LINKISH.search(words):
        out = " ".join(_code_span(w) if _LINKISH.search(w) else _escape(w) for w in words.split(" "))
    else:
        out = _escape(words)
    if out[:1] == "-" or out[:1].isdigit():
        out = _LIST_START.sub(r"\1\\\2", out, count=1)    # "1. x", "- x" would start a (nested) list
    return out


def _escape(out: str) -> str:
    for c in _MD_SPECIAL:
        if c in out:                  # most chart text has none or one of these: test before replacing
            out = out.replace(c, "\\" + c)
    return out


def _code_span(word: str) -> str:
    """`word` verbatim: a fence longer than any backtick run in it, padded when it starts or ends with one."""
    fence = "`" * (max((len(r) for r in re.findall("`+", word)), default=0) + 1)
    pad = " " if word.startswith("`") or word.endswith("`") else ""
    return f"{fence}{pad}{word}{pad}{fence}"


TIER_LABELS = {
    "very_high": "very high dose",
    "high": ">= 7.5 mg/day prednisone-equivalent",
    "standard": ">= 2.5 mg/day for >= 3 months",
    "dose_not_recorded": ">= 90 days, dose not recorded",
    "budesonide_review": "oral budesonide >= 90 days: review",
}


class CardRenderer:
    def __init__(self, catalog: Catalog, new_uuid: Callable[[], str] | None = None):
        self.cat = catalog
        self.cfg = catalog.card
        self.new_uuid = new_uuid or (lambda: str(uuid.uuid4()))
        self.workup = {w["id"]: w for tier in catalog.detection["workup"].values() for w in tier}
        self.baseline_ids = [w["id"] for w in catalog.detection["workup"]["baseline"]]
        self.policy = catalog.detection.get("workup_policy") or {}
        self.order_labels = self.cfg.get("order_labels", {})
        self.imaging_ids = {w["id"] for w in catalog.detection["workup"]["imaging"]}
        codes = {}
        for w in self.workup.values():
            for c in w["codes"]:
                codes[c["code"]] = c
        self.codes = codes
        # catalog wording, escaped once: only chart text needs escaping per request
        self._guidelines_cache: dict[tuple[str, ...], str] = {}
        self.override_reasons = [
            {"system": self.cfg["override_reasons"]["system"], "code": r["code"], "display": r["display"]}
            for r in self.cfg["override_reasons"]["codes"]]

    def render(self, a: Assessment) -> list[dict]:
        if not a.card_due:
            return []
        firing, listed = a.triggering, a.listed
        known = a.known_before_treatment              # on therapy: causes recorded before it began are listed
        care = a.care
        quiet = quiet_indicator(self.cat.settings)
        if quiet:
            strong = any(f.warning for f in firing)          # info by default; warning where the policy says
        else:
            strong = any(f.cause.strength == "strong" for f in firing)
        ctx = a.context
        gap = ctx.treatment_gap
        alarm = bool(care.conflicts) or any(alert.warning for alert in care.alerts)
        treated = bool(ctx.treatments) and not (quiet and strong)
        indicator = "treatment_gap" if gap or alarm else "on_treatment" if treated else \
            "strong_cause" if strong else "otherwise"
        if known:
            firing, listed = [f for f in firing if f not in known], known + listed
        card = {
            "uuid": self.new_uuid(),
            "summary": self.lead_summary(a, firing, known),
            "indicator": self.cfg["indicator"][indicator],
            "detail": self.detail(a, firing, listed),
            "source": self.source(),
        }
        suggestions = self.suggestions(a, firing)
        if suggestions:
            card["suggestions"] = suggestions
            card["selectionBehavior"] = "any"
        card["overrideReasons"] = [dict(r) for r in self.override_reasons]
        links = self.links(firing, care)
        if links:
            card["links"] = links
        return [card]

    # ---- summary ----------------------------------------------------------------------------
    def lead_summary(self, a: Assessment, firing: list[Finding], known: list[Finding]) -> str:
        """What leads: a drug-safety conflict on a drug the patient is on, a therapy alert, the treatment gap, the
        therapy, a screening prompt, then the causes."""
        care, ctx = a.care, a.context
        limit = self.cfg["summary"]["max_length"]
        if care.conflicts:
            c = care.conflicts[0]
            return _clip(self.cat.therapy["safety"]["wording"]["summary"].format(drug=c.drug, conflict=c.text), limit)
        if care.alerts:
            return _clip(care.alerts[0].summary, limit)
        if ctx.treatment_gap:
            return self.gap_summary(a, firing)
        if ctx.courses:
            return self.treated_summary(a, firing, known)
        if not firing and care.also:
            return _clip(care.also[0].text, limit)
        if not firing and care.normal_bmd_note:
            return _clip(self.cfg["summary"]["normal_bmd"].format(
                t_score=ctx.latest_t_score[0], site=ctx.normal_bmd_fractures[0].site), limit)
        if not firing and care.screening:
            return self.screening_summary(a)
        return self.summary(firing)

    def summary(self, firing: list[Finding]) -> str:
        cfg = self.cfg["summary"]
        for template in (cfg["template"], cfg["template_short"]):
            text, fits = self._fit(template, firing)
            if fits:
                return text
        return cfg["template_short"].format(causes=self._short(firing[0]))[: cfg["max_length"] - 1] + "…"

    def gap_summary(self, a: Assessment, firing: list[Finding]) -> str:
        """The treatment gap leads; the causes follow as far as the length allows. Where the treatment line rules out
        a bone drug for now (a young adult, pregnancy or lactation, CKD G4-G5), the summary says so."""
        cfg = self.cfg["summary"]
        bone = cfg["gap_bone"][a.context.bone_kind]
        if a.care.line is not None and a.care.line.summary:
            return _clip(a.care.line.summary.format(bone=bone), cfg["max_length"])
        refer = a.care.line is not None and a.care.line.no_drug_drafts
        template, short = ("gap_refer_template", "gap_refer_template_short") if refer else \
            ("gap_template", "gap_template_short")
        text, fits = self._fit(cfg[template], firing, bone=bone)
        return text if fits else cfg[short].format(bone=bone)

    def treated_summary(self, a: Assessment, new: list[Finding], known: list[Finding]) -> str:
        """On osteoporosis therapy: the causes that appeared since it began; else the next decision point;
        else the causes known before it."""
        cfg = self.cfg["summary"]
        course = a.context.courses[0]
        fields = {"drug": course.drug, "since": course.start.isoformat()[:7]}
        limit = cfg["max_length"]
        if not new and a.context.next_decision:
            text = cfg["treated_decision"].format(decision=a.context.next_decision, **fields)
            if len(text) <= limit:
                return text
        text, fits = self._fit(cfg["treated_new"] if new else cfg["treated_known"], new or known, **fields)
        return text if fits else text[: limit - 1] + "…"

    def screening_summary(self, a: Assessment) -> str:
        cfg = self.cfg["summary"]
        text, fits = self._fit(cfg["screening"], a.listed, age=a.record.age)
        return text if fits else cfg["screening_short"].format(age=a.record.age)

    def _fit(self, template: str, findings: list[Finding], **fields) -> tuple[str | None, bool]:
        """The template with as many cause names as fit the summary length ("+n more" for the rest): the
        text, and whether it fits (else the shortest attempt; None with no causes)."""
        cfg = self.cfg["summary"]
        names = [self._short(f) for f in findings]
        text = None
        for shown in range(len(names), 0, -1):
            parts = names[:shown] + ([cfg["more"].format(n=len(names) - shown)] if shown < len(names) else [])
            text = template.format(causes=", ".join(parts), **fields)
            if len(text) <= cfg["max_length"]:
                return text, True
        return text, False

    def _short(self, f: Finding) -> str:
        name = (f.variant or {}).get("short_name") or f.cause.short_name
        if f.tier == "very_high":
            name += " (very high dose)"
        return name

    # ---- detail -----------------------------------------------------------------------------
    def detail(self, a: Assessment, firing: list[Finding], listed: list[Finding]) -> str:
        ctx_cfg = self.cfg["context"]
        ctx = a.context
        care = a.care
        s = self.cat.settings

        def cause_view(f: Finding) -> SimpleNamespace:
            # words and dates only: resource ids and codes stay in --explain
            evidence = [md(e.text) for e in f.evidence]
            evidence += [f"Supporting: {md(e.text)}" for e in f.supporting]
            risk = None
            if f.cause.id == "glucocorticoids" and care.gc_risk is not None:
                line = f" {care.gc_line.text}" if care.gc_line else ""
                reasons = f" ({'; '.join(care.gc_risk.reasons)})" if care.gc_risk.reasons else ""
                risk = md(f"ACR 2022 fracture risk: {care.gc_risk.label}{reasons}.{line}")
            return SimpleNamespace(label=md(self.label(f)), tier=self._tier_md(f.tier),
                                   strength=f.cause.strength, evidence=evidence, risk=risk,
                                   next_step=md(self.next_step(f, a)), sources=self.sources_md(f.citations))

        bone_items = [e.text for e in ctx.bone_diagnoses[:3]]
        bone = ctx_cfg["bone_diagnosis"].format(items="; ".join(md(x) for x in bone_items)) if bone_items \
            else ctx_cfg["no_bone_diagnosis"]
        if care.normal_bmd_note:
            bone += " " + md(care.normal_bmd_note)
        days = s.get("recent_dxa_days", 730)
        dxa_blocked = self._no_dxa(a)
        dxa = ctx_cfg["dxa_recent"].format(date=ctx.last_dxa.isoformat(), days=days) if ctx.last_dxa \
            else ctx_cfg["dxa_pregnant"] if ctx.pregnant and self.policy.get("no_dxa_when_pregnant") \
            else ctx_cfg["dxa_not_offered"] if dxa_blocked \
            else ctx_cfg["dxa_none"].format(days=days)
        if ctx.latest_frax:
            dxa += " " + ctx_cfg["frax_recent"].format(value=ctx.latest_frax[0], date=ctx.latest_frax[1].isoformat())
        elif not ctx.courses and a.record.age is not None and a.record.age >= 40 and not ctx.pregnant:
            dxa += " " + ctx_cfg["frax_none"].format(days=days)
        if ctx.courses:
            treatment = ctx_cfg["treatment_current"].format(
                items="; ".join(md(e.text) for e in ctx.treatments[:3]))
            if ctx.next_decision:
                treatment += " " + ctx_cfg["next_decision"].format(text=md(ctx.next_decision))
        elif ctx.treatments:
            treatment = ctx_cfg["treatment_current"].format(items="; ".join(md(e.text) for e in ctx.treatments[:3]))
        elif ctx.therapy.courses:
            past = [f"{c.label or c.drug}, {c.start.isoformat()[:7]} to {c.last.isoformat()[:7]}"
                    + (f" (last dose {c.last.isoformat()})" if c.cls.get("dose_every_days") else "")
                    for c in reversed(ctx.therapy.courses)]
            treatment = ctx_cfg["treatment_past"].format(items="; ".join(md(x) for x in past[:3]))
        else:
            treatment = ctx_cfg["treatment_none"]
        if ctx.latest_t_score:
            value, site, day = ctx.latest_t_score
            bone += " " + ctx_cfg["latest_t_score"].format(value=value, site=md(site), date=day.isoformat())
        if ctx.young_adult and ctx.latest_z_score:
            value, site, day = ctx.latest_z_score
            bone += " " + ctx_cfg["latest_z_score"].format(value=value, site=md(site), date=day.isoformat())
        alerts = [SimpleNamespace(heading=md(alert.summary), detail=md(alert.detail),
                                  sources=self.sources_md(alert.citations)) for alert in care.alerts]
        gap = None
        if ctx.treatment_gap:
            shown = [e.text for e in ctx.gap_fractures + ctx.osteoporosis] + ([ctx.low_bmd.text] if ctx.low_bmd else [])
            line = care.line
            risk = care.risk
            gap = SimpleNamespace(bone=md(self.cfg["summary"]["gap_bone"][ctx.bone_kind]),
                                  evidence=[md(x) for x in shown[:4]],
                                  risk=md(f"{risk.label}" + (f" ({'; '.join(risk.reasons)})" if risk.reasons else ""))
                                  if risk and not ctx.young_adult else None,
                                  risk_source=self.citation_names([risk.citation]) if risk else "",
                                  options=md(line.text) if line else "",
                                  guidelines=self._guidelines_md(line.citations if line else []),
                                  also=[md(f"{x.text} ({self.citation_names(x.citations)})") for x in care.also])
        elif care.also:
            alerts += [SimpleNamespace(heading=md(x.text), detail=md(self.next_step_for(x, a)),
                                       sources=self.sources_md(x.citations)) for x in care.also]
        conflicts = [SimpleNamespace(text=md(f"{c.drug}: {c.text}"), sources=md(self.citation_names(c.citations)))
                     for c in care.conflicts]
        screening = None
        if care.screening and not firing:
            sc = self.cat.therapy["advice"]["screening"]
            names = ", ".join(self._short(f) for f in a.listed)
            screening = md(" ".join(self.cfg["screening"]["text"].format(
                causes=names[:1].upper() + names[1:], sex="woman" if a.record.sex == "female" else "man",
                age=a.record.age, from_age=sc["ages"].get(a.record.sex or "", 65),
                guidelines=self.citation_names(sc["citations"])).split()))
        kidney = self.kidney_view(ctx)
        wdays = s.get("recent_workup_days", 365)
        done = [self.workup[w]["label"] for w in self.baseline_ids if w in ctx.workup_done]
        workup = ctx_cfg["workup_done"].format(days=wdays, items="; ".join(md(x) for x in done)) if done \
            else ctx_cfg["workup_none_done"].format(days=wdays)
        # template variables as attributes: Jinja looks attributes up first, dict keys only after a miss
        listed_view = [SimpleNamespace(label=md(self.label(f)), evidence=[md(e.text) for e in f.evidence])
                       for f in listed]
        results = [f"{label} {value} ({day})" for label, value, day in self.latest_results(a)]
        results_line = ctx_cfg["latest_results"].format(items="; ".join(results)) if results \
            else ctx_cfg["no_results"].format(days=s.get("latest_results_days", 730))
        text = self.cat.templates["detail"].render(
            alerts=alerts, conflicts=conflicts, gap=gap, kidney=kidney, causes=[cause_view(f) for f in firing],
            screening=screening, listed=listed_view,
            context=SimpleNamespace(bone_status=bone, dxa=dxa, treatment=treatment, workup=workup, results=results_line))
        while "\n\n\n" in text:                  # template blocks that rendered empty
            text = text.replace("\n\n\n", "\n\n")
        return text.strip()

    def label(self, f: Finding) -> str:
        """The cause's name, or its variant's (lithium-associated hyperparathyroidism), marked when only suspected."""
        name = (f.variant or {}).get("label") or f.cause.label
        return f"{name} (suspected)" if f.suspected else name

    @staticmethod
    def next_step_for(line, a: Assessment) -> str:
        """The workup that goes with an `also` line (surgical referral: the tests the surgeon will want)."""
        return "Calcium, PTH, 25-OH vitamin D, creatinine/eGFR and 24-h urine calcium; DXA including the 1/3 radius."

    def next_step(self, f: Finding, a: Assessment) -> str:
        actions = (f.variant or {}).get("actions") or f.cause.card.get("actions") or [""]
        return actions[0]

    def sources_md(self, citations: list[str]) -> str:
        """"Guideline: ACR 2022" and, apart, "quality measure: CMS249" (a measure is never called a guideline)."""
        guides = [c for c in citations if self.cat.citations.get(c, {}).get("kind", "guideline") != "quality_measure"]
        measures = [c for c in citations if c not in guides]
        parts = []
        if guides:
            parts.append(f"Guideline: {self._guidelines_md(guides)}")
        if measures:
            parts.append(f"{'quality' if parts else 'Quality'} measure: {self._guidelines_md(measures)}")
        return "; ".join(parts)

    def source(self) -> dict:
        return {"label": self.cfg["source"]["label"], "topic": dict(self.cfg["source"]["topic"])}

    def kidney_view(self, ctx) -> SimpleNamespace | None:
        """The kidney block (latest eGFR, the caution before antiresorptives, why), or None."""
        if not ctx.kidney_caution:
            return None
        kcfg = self.cfg["kidney"]
        latest = kcfg["latest"].format(value=ctx.latest_egfr[0], date=ctx.latest_egfr[1].isoformat()) \
            if ctx.latest_egfr else kcfg["none"]
        return SimpleNamespace(
            latest=md(latest), evidence=[md(e.text) for e in ctx.kidney_caution[:3]],
            caution=md(kcfg["caution"].format(
                guidelines=self.citation_names(self.cat.detection["kidney_caution"]["citations"]))))

    def latest_results(self, a: Assessment) -> list[tuple[str, str, str]]:
        """The numbers a clinician checks before bone treatment: eGFR, calcium, 25-OH D, ALP (newest, 2 years)."""
        rec = a.record
        since = rec.as_of - timedelta(days=self.cat.settings.get("latest_results_days", 730))
        out = []
        for label, group, fmt in LATEST_RESULTS:
            codes = self.cat.loinc_groups.get(group, [])
            m = rec.newest(codes, since, valued=True)
            if m is not None:
                out.append((label, fmt.format(m.value), m.when.isoformat()))
        return out

    def _tier_md(self, tier: str | None) -> str | None:
        return md(TIER_LABELS.get(tier, tier)) if tier else None

    def _guidelines_md(self, citations: list[str]) -> str:
        key = tuple(citations)
        out = self._guidelines_cache.get(key)
        if out is None:
            out = self._guidelines_cache[key] = ", ".join(md(self._citation_name(c)) for c in citations)
        return out

    def citation_names(self, citations: list[str]) -> str:
        return ", ".join(self._citation_name(c) for c in citations)

    def _citation_name(self, cid: str) -> str:
        c = self.cat.citations.get(cid, {})
        if not c:
            return cid
        return c.get("short") or f"{c.get('org', cid)} {c.get('year', '')}".strip()

    # ---- suggestions ------------------------------------------------------------------------
    def suggestions(self, a: Assessment, firing: list[Finding]) -> list[dict]:
        """One suggestion per test (one click each): core labs on every card, extended labs only with low bone
        density or a fragility fracture on record, then each cause's tests, then the DXA; every test once, none
        resulted recently, none the patient's sex, age or findings rule out (workup_policy in detection.yaml).
        `isRecommended` only where a guideline recommends the test for this patient: the baseline workup with low
        bone density, a fracture or a bone-therapy question on record (AACE 2020, BHOF 2022); a cause's own tests when
        the cause fires; the DXA when one is due."""
        pol = self.policy
        ctx = a.context
        patient_ref = f"Patient/{a.patient_id}"
        found = {f.cause.id for f in a.findings if not f.suspected}
        ordered: set[str] = set()

        def allowed(wid: str) -> bool:
            item = self.workup[wid]
            if wid in ctx.workup_done or (item.get("applies_to") and item["applies_to"] != a.record.sex):
                return False
            min_age = pol.get("min_age", {}).get(wid)
            if min_age is not None and (a.record.age is None or a.record.age < min_age):
                return False
            return not found.intersection(pol.get("not_with_findings", {}).get(wid, ()))

        def suggestion(wid: str, recommended: bool) -> dict | None:
            codes = [c for c in self.workup[wid]["order"] if c not in ordered]
            if wid in pol.get("with_calcium", ()) and pol.get("calcium_order") and pol["calcium_order"] not in ordered \
                    and not ("wk_cmp" in ordered_items and "wk_cmp" not in ctx.workup_done):
                codes.append(pol["calcium_order"])
            if not codes:
                return None
            ordered.update(codes)
            ordered_items.add(wid)
            name = self.order_labels[codes[0]] if len(self.workup[wid]["order"]) == 1 else self.workup[wid]["label"]
            label = self.cfg["suggestions"]["directed_label"].format(label=name)
            return {"label": label, "uuid": self.new_uuid(), "isRecommended": recommended,
                    "actions": self.orders(codes, patient_ref)}

        ordered_items: set[str] = set()
        bone = bool(ctx.osteoporosis or ctx.low_bmd or ctx.fractures)
        # on therapy with no new cause since it began: monitoring labs only, not the secondary-cause search again
        settled = (bool(ctx.courses) or bool(a.care.alerts)) and not ctx.treatment_gap and not firing
        tiers = pol.get("core", []) + (pol.get("extended", []) if bone and not settled else [])
        baseline_recommended = bone or ctx.treatment_gap or bool(a.care.alerts or a.care.conflicts or ctx.courses)
        out = [s for wid in tiers if allowed(wid) for s in [suggestion(wid, baseline_recommended)] if s]
        firing_ids = {f.cause.id for f in firing}
        directed: dict[str, bool] = {}
        for f in firing + a.listed:
            for wid in f.cause.workup:
                if wid not in self.imaging_ids:
                    directed[wid] = directed.get(wid, False) or f.cause.id in firing_ids
        out += [s for wid, rec in directed.items() if allowed(wid) for s in [suggestion(wid, rec)] if s]
        if ctx.last_dxa is None and not self._no_dxa(a):
            cfg = self.cfg["suggestions"]
            gc = any(f.cause.id == "glucocorticoids" for f in firing)
            iscd = not gc and self._vfa_by_age_and_t_score(a)
            item = self.workup["wk_vfa" if gc or iscd else "wk_dxa"]
            label = cfg["dxa_vfa_label" if gc else "dxa_vfa_iscd_label" if iscd else "dxa_label"]
            acts = self.orders(item["order"], patient_ref)
            if found.intersection(pol.get("forearm_dxa_for", ())) and pol.get("forearm_dxa_order"):
                acts += self.orders([pol["forearm_dxa_order"]], patient_ref)
            out.append({"label": label, "uuid": self.new_uuid(), "isRecommended": True, "actions": acts})
        return out

    def _no_dxa(self, a: Assessment) -> bool:
        """No DXA while pregnant (radiation; bone density not interpretable), nor in active myeloma (bone disease is
        imaged by skeletal survey or low-dose CT, not DXA): workup_policy."""
        pol = self.policy
        if a.context.pregnant and pol.get("no_dxa_when_pregnant"):
            return True
        found = {f.cause.id for f in a.findings if not f.suspected}
        return bool(found.intersection(pol.get("no_dxa_with_findings", ())))

    def _vfa_by_age_and_t_score(self, a: Assessment) -> bool:
        """ISCD 2023: vertebral fracture assessment with the DXA for a T-score below -1.0 at age >= 70 (women)
        or >= 80 (men) (workup_policy.vfa)."""
        rule = self.policy.get("vfa")
        t = a.context.latest_t_score
        if not rule or t is None or t[0] >= rule["t_score_below"] or a.record.age is None:
            return False
        min_age = rule["min_age"].get(a.record.sex or "")
        return min_age is not None and a.record.age >= min_age

    def orders(self, codes: list[str], patient_ref: str) -> list[dict]:
        """"Order <short label>" ServiceRequest drafts for these workup codes."""
        template = self.cfg["suggestions"]["baseline_action"]
        return [self.service_request(template.format(label=self.order_labels[c]), c, patient_ref) for c in codes]

    def service_request(self, description: str, code: str, patient_ref: str) -> dict:
        c = self.codes[code]
        return {
            "type": "create",
            "description": description,
            "resource": {
                "resourceType": "ServiceRequest",
                "status": "draft",
                "intent": "proposal",
                "code": {"coding": [{"system": c["system"], "code": c["code"], "display": c["display"]}],
                         "text": c["display"]},
                "subject": {"reference": patient_ref},
                "reasonCode": [{"text": self.cfg["suggestions"]["reason_text"]}],
            },
        }

    # ---- links ------------------------------------------------------------------------------
    def links(self, firing: list[Finding], care=None) -> list[dict]:
        """The guidelines behind what leads the card (alerts, conflicts, the treatment line), then those the firing
        causes cite, the most cited first."""
        lead: list[str] = []
        if care is not None:
            lead = [c for x in care.alerts for c in x.citations] + [c for x in care.conflicts for c in x.citations]
        counts: dict[str, int] = {}
        for f in firing:
            for c in f.citations:
                counts[c] = counts.get(c, 0) + 1
        return self.citation_links(list(dict.fromkeys(lead + sorted(counts, key=lambda cid: -counts[cid]))))

    def citation_links(self, citation_ids: list[str]) -> list[dict]:
        """Absolute links to these guidelines, in this order, those with an https URL, up to links.max."""
        out = []
        for cid in citation_ids:
            c = self.cat.citations.get(cid, {})
            url = c.get("url")
            if not url or not str(url).startswith("https://"):
                continue
            out.append({"label": f"{c.get('org', cid)} {c.get('year', '')}: {c.get('title', '')}"[:200].strip(),
                        "url": url, "type": "absolute"})
            if len(out) >= self.cfg["links"]["max"]:
                break
        return out





def _clip(text: str, limit: int) -> str:
    """A summary within the CDS Hooks limit (< 140 characters), cut at a word with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: limit - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"
