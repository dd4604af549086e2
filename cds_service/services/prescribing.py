"""order-sign and order-select: bone protection when a glucocorticoid, an aromatase inhibitor or
androgen deprivation is being ordered (ACR 2022, ASCO 2019, CMS645)."""
from __future__ import annotations

from ..clinical.assessment import Assessment
from ..errors import BadRequest
from ..rendering.order_cards import OrderCardRenderer
from ..clinical.orders import ProtectionAdvisor, ProtectionDecision
from ..fhir.prefetch import PrefetchResult
from ..fhir.record import PatientRecord, reference_of
from .base import CdsService, Toolkit


class BoneProtectionAtOrderSign(CdsService):
    id = "bone-protection-order-sign"
    hook = "order-sign"
    title = "Bone protection when prescribing"
    description = ("When a systemic glucocorticoid course of 3 months or more (with what is already on record), an "
                   "aromatase inhibitor or androgen deprivation is about to be signed: the ACR 2022 fracture-risk "
                   "stratum, a baseline DXA, calcium and vitamin D, and, where every safety check holds, an oral "
                   "bisphosphonate to consider.")

    def __init__(self, kit: Toolkit):
        super().__init__(kit)
        self.advisor = ProtectionAdvisor(kit.catalog)
        self.cards = OrderCardRenderer(kit.catalog, kit.renderer)

    def check_context(self, context: dict) -> None:
        if not isinstance(context.get("userId"), str) or not context["userId"].strip():
            raise BadRequest("'context.userId' is required.")
        orders = context.get("draftOrders")
        if not isinstance(orders, dict) or orders.get("resourceType") != "Bundle":
            raise BadRequest("'context.draftOrders' is required and must be a FHIR Bundle.")
        entries = orders.get("entry", [])
        if not isinstance(entries, list) or any(not isinstance(e, dict) or not isinstance(e.get("resource"), dict)
                                                for e in entries):
            raise BadRequest("'context.draftOrders.entry' must be a list of entries, each with a 'resource' object.")

    def drafts(self, request: dict) -> list[dict]:
        """Every MedicationRequest in draftOrders."""
        return [e["resource"] for e in request["context"]["draftOrders"].get("entry", [])
                if e["resource"].get("resourceType") == "MedicationRequest"]

    def decide(self, request: dict, prefetch: PrefetchResult,
               record: PatientRecord) -> tuple[Assessment, ProtectionDecision]:
        assessment = self.kit.engine.assess(record)
        decision = self.advisor.decide(assessment, record.planned)
        self._once_per_draft(request, record, decision)
        return assessment, decision

    def _once_per_draft(self, request: dict, record: PatientRecord, decision: ProtectionDecision) -> None:
        """One card per draft: a draft that had its card at order-select gets none at order-sign (the clinician saw
        it a moment ago); the drafts that get one at order-select are remembered."""
        shown = self.kit.shown_drafts
        server = request.get("fhirServer") or ""
        by_ref = {reference_of(r): r for r in self.drafts(request)}
        keys = {m.reference: shown.key(server, record.patient_id, by_ref.get(m.reference, {}))
                for m in record.planned}
        lead_refs = [r for r in [o.exposure.reference for o in decision.ordered]
                     + [b.exposure.reference for b in decision.bone_drugs] if r in keys]
        if not lead_refs:
            return
        if self.hook == "order-sign" and all(shown.shown_at_select(keys[r]) for r in lead_refs):
            decision.ordered, decision.bone_drugs = [], []
        elif self.hook == "order-select":
            for r in lead_refs:
                shown.remember(keys[r], self.hook)

    def render(self, decision: ProtectionDecision) -> list[dict]:
        return self.cards.render(decision)


class BoneProtectionAtOrderSelect(BoneProtectionAtOrderSign):
    id = "bone-protection-order-select"
    hook = "order-select"
    description = ("As a systemic glucocorticoid course of 3 months or more (with what is already on record), an "
                   "aromatase inhibitor or androgen deprivation is selected, before it is signed: the ACR 2022 "
                   "fracture-risk stratum, a baseline DXA, calcium and vitamin D, and, where every safety check "
                   "holds, an oral bisphosphonate to consider.")

    def check_context(self, context: dict) -> None:
        super().check_context(context)
        selections = context.get("selections")
        if not isinstance(selections, list) or not selections or \
                any(not isinstance(s, str) or not s.strip() for s in selections):
            raise BadRequest("'context.selections' is required: a non-empty list of references into draftOrders.")
        known = {reference_of(e["resource"]) for e in context["draftOrders"].get("entry", [])}
        missing = [s for s in selections if s not in known]
        if missing:
            raise BadRequest(f"'context.selections' names '{missing[0][:80]}', which is not in draftOrders.")

    def drafts(self, request: dict) -> list[dict]:
        """Only the selected MedicationRequests."""
        chosen = set(request["context"]["selections"])
        return [r for r in super().drafts(request) if reference_of(r) in chosen]
