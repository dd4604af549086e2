"""Turns a ProtectionDecision into the one prescribing card (or none), with the wording in cards/orders.yaml."""
from __future__ import annotations

from types import SimpleNamespace

from .cards import CardRenderer, md
from ..knowledge.catalog import Catalog
from ..clinical.orders import ProtectionDecision


class OrderCardRenderer:
    def __init__(self, catalog: Catalog, shared: CardRenderer):
        self.cat = catalog
        self.cfg = catalog.orders["card"]
        self.drafts = catalog.orders["drafts"]
        self.shared = shared                     # source, links, ServiceRequest drafts, citation names
        reasons = self.cfg["override_reasons"]
        self.override_reasons = [{"system": reasons["system"], "code": r["code"], "display": r["display"]}
                                 for r in reasons["codes"]]

    def render(self, d: ProtectionDecision) -> list[dict]:
        if d.silenced:
            return []                        # deceased, hospice or comfort care
        if d.bone_drugs:
            return [self.safety_card(d)]
        if not d.ordered or d.on_therapy:
            return []
        lead = d.lead
        summary = lead.trigger["summary"].format(regimen=lead.regimen)
        if len(summary) > 139:
            summary = summary[:138] + "…"
        act = d.dxa_due or (d.risk is not None and (d.risk.level == "undetermined" or d.offer_bisphosphonate
                                                    or bool(d.guards_failed)))
        card = {
            "uuid": self.shared.new_uuid(),
            "summary": summary,
            "indicator": self.cfg["indicator"]["act" if act else "inform"],
            "detail": self.detail(d),
            "source": self.shared.source(),
            "suggestions": self.suggestions(d),
            "selectionBehavior": "any",
            "overrideReasons": [dict(r) for r in self.override_reasons],
        }
        links = self.shared.citation_links(list(dict.fromkeys(c for o in d.ordered for c in o.trigger["citations"])))
        if links:
            card["links"] = links
        return [card]

    def safety_card(self, d: ProtectionDecision) -> dict:
        """A bone-drug draft that a safety rule stands against (alendronate in pregnancy, zoledronic acid at eGFR 28)."""
        cfg = self.cfg["safety"]
        lead = d.bone_drugs[0]
        summary = cfg["summary"].format(regimen=lead.regimen, conflict=lead.conflicts[0].text)
        if len(summary) > 139:
            summary = summary[:138].rsplit(" ", 1)[0] + "…"
        lines = [f"**{md(cfg['heading'].format(regimen=b.regimen))}**\n" + "\n".join(
            f"- {md(c.text)} ({md(self.shared.citation_names(c.citations))})" for c in b.conflicts) for b in d.bone_drugs]
        results = [f"{label} {value} ({day})" for label, value, day in self.shared.latest_results(d.assessment)]
        if results:
            lines.append("**Bone health context**\n- " + md(self.cfg["results"].format(items="; ".join(results))))
        cites = list(dict.fromkeys(c for b in d.bone_drugs for x in b.conflicts for c in x.citations))
        card = {"uuid": self.shared.new_uuid(), "summary": summary, "indicator": "warning",
                "detail": "\n\n".join(lines), "source": self.shared.source(),
                "overrideReasons": [dict(r) for r in self.override_reasons]}
        links = self.shared.citation_links(cites)
        if links:
            card["links"] = links
        return card

    def detail(self, d: ProtectionDecision) -> str:
        a, ctx, cfg = d.assessment, d.assessment.context, self.cfg
        regimens = list(dict.fromkeys(o.regimen for o in d.ordered))
        whys = list(dict.fromkeys(o.trigger["why"] for o in d.ordered))
        context = []
        days = d.dxa_window_days
        if ctx.last_dxa and not d.dxa_due:
            context.append(cfg["dxa_recent"].format(date=ctx.last_dxa.isoformat(), days=days))
        elif ctx.pregnant is not None:
            context.append(cfg["dxa_pregnant"])
        else:
            context.append(cfg["dxa_none"].format(days=days))
        if ctx.latest_t_score:
            value, site, day = ctx.latest_t_score
            context.append(cfg["t_score"].format(value=value, site=site or "site not recorded", date=day.isoformat()))
        if ctx.fractures:
            context.append(cfg["fractures"].format(items="; ".join(f.text for f in ctx.fractures[:3])))
        context.append(cfg["no_treatment"])
        results = [f"{label} {value} ({day})" for label, value, day in self.shared.latest_results(a)]
        if results:
            context.append(cfg["results"].format(items="; ".join(results)))
        risk = None
        if d.risk is not None:
            reasons = [md(r) for r in d.risk.reasons] + ([md(d.line.text)] if d.line else [])
            risk = SimpleNamespace(label=md(d.risk.label), reasons=reasons)
        text = self.cat.templates["order_detail"].render(
            orders=[md(r) for r in regimens], why=md(" ".join(whys)), exposure=[md(e) for e in d.exposure],
            risk=risk, guards=[md(g) for g in d.guards_failed], kidney=self.shared.kidney_view(ctx),
            context=[md(c) for c in context])
        while "\n\n\n" in text:
            text = text.replace("\n\n\n", "\n\n")
        return text.strip()

    def suggestions(self, d: ProtectionDecision) -> list[dict]:
        a, ctx = d.assessment, d.assessment.context
        patient = f"Patient/{a.patient_id}"
        sug_cfg = self.shared.cfg["suggestions"]
        out = []
        if d.dxa_due:
            # the leading drug's DXA: with vertebral fracture assessment for glucocorticoids (orders.yaml dxa_workup)
            gc = d.lead.trigger.get("risk") == "glucocorticoid"
            item = self.shared.workup[d.lead.trigger["dxa_workup"]]
            out.append({"label": sug_cfg["dxa_vfa_label" if gc else "dxa_label"], "uuid": self.shared.new_uuid(),
                        "isRecommended": True, "actions": self.shared.orders(item["order"], patient)})
        if "wk_25ohd" not in ctx.workup_done:
            item = self.shared.workup["wk_25ohd"]
            out.append({"label": sug_cfg["directed_label"].format(label=item["label"]), "uuid": self.shared.new_uuid(),
                        "isRecommended": True, "actions": self.shared.orders(item["order"], patient)})
        cad = self.drafts["calcium_vitamin_d"]
        out.append({"label": cad["label"], "uuid": self.shared.new_uuid(), "isRecommended": True,
                    "actions": [self._medication_action(cad, patient)]})
        if d.offer_bisphosphonate:
            aln = self.drafts["alendronate"]
            out.append({"label": aln["label"], "uuid": self.shared.new_uuid(), "isRecommended": False,
                        "actions": [self._medication_action(aln, patient, weekly=True)]})
        return out

    def _medication_action(self, draft: dict, patient: str, weekly: bool = False) -> dict:
        """A draft MedicationRequest: the verified code when the catalog has one, else the drug in words."""
        concept: dict = {"text": draft["text"]}
        if draft.get("code"):
            c = draft["code"]
            concept["coding"] = [{"system": c["system"], "code": c["code"], "display": c["display"]}]
        dosage: dict = {"text": draft["dosage"]}
        if weekly and draft.get("dose_mg"):
            dosage["timing"] = {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}}
            dosage["route"] = {"text": "oral"}
            dosage["doseAndRate"] = [{"doseQuantity": {"value": draft["dose_mg"], "unit": "mg",
                                                       "system": "http://unitsofmeasure.org", "code": "mg"}}]
        return {
            "type": "create",
            "description": f"Draft: {draft['label']}",
            "resource": {
                "resourceType": "MedicationRequest",
                "status": "draft",
                "intent": "proposal",
                "medicationCodeableConcept": concept,
                "subject": {"reference": patient},
                "dosageInstruction": [dosage],
                "reasonCode": [{"text": "Bone protection (secondary osteoporosis CDS)"}],
            },
        }
