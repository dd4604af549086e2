"""The CDS services this server offers, one small module each, sharing one Toolkit.

Adding a service: write a CdsService subclass (which hook, which context, which decision, which
card) and list it in SERVICES.
"""
from __future__ import annotations

from ..knowledge.catalog import Catalog
from ..errors import NotFound
from ..fhir.fhir_client import FhirClient
from .collector import CollectBetween, keep_out_of_gc_scans
from .base import CdsService, Invocation, Toolkit, validate_request
from .patient_view import SecondaryOsteoporosis, explain, explain_context
from .prescribing import BoneProtectionAtOrderSelect, BoneProtectionAtOrderSign

SERVICES: tuple[type[CdsService], ...] = (SecondaryOsteoporosis, BoneProtectionAtOrderSign, BoneProtectionAtOrderSelect)

__all__ = ["CdsService", "Invocation", "ServiceRegistry", "Toolkit", "SERVICES", "SecondaryOsteoporosis",
           "BoneProtectionAtOrderSign", "BoneProtectionAtOrderSelect", "explain", "explain_context",
           "validate_request", "evaluation_line", "CollectBetween", "keep_out_of_gc_scans"]


class ServiceRegistry:
    """The services by id, in discovery order, over one shared Toolkit."""

    def __init__(self, catalog: Catalog, fhir_client: FhirClient, fhir_timeout: float = 3.0, page_size: int = 200,
                 fhir_allowlist: tuple[str, ...] = ()):
        self.kit = Toolkit(catalog, fhir_client, fhir_timeout, page_size, fhir_allowlist)
        self.services: dict[str, CdsService] = {cls.id: cls(self.kit) for cls in SERVICES}

    def __iter__(self):
        return iter(self.services.values())

    def get(self, service_id: str) -> CdsService:
        try:
            return self.services[service_id]
        except KeyError:
            raise NotFound("No CDS service with that id.") from None

    def for_hook(self, hook: str) -> CdsService | None:
        return next((s for s in self if s.hook == hook), None)

    def discovery(self) -> dict:
        return {"services": [s.discovery() for s in self]}


def evaluation_line(services: ServiceRegistry, body: object, as_of, explain_it: bool, snoozed=None) -> dict:
    """One line of `cds-service evaluate` (and of `cds-service screen`'s findings.ndjson): the service's
    response for a request, and with `explain_it` the patient, findings and context. `snoozed(body, result)`
    says whether the service's own store would have suppressed the cards. Both commands build their lines here,
    so a population screen and a single evaluation can never disagree."""
    service = services.for_hook(body.get("hook")) if isinstance(body, dict) else None    # the service for its hook
    result = (service or services.get("secondary-osteoporosis")).invoke(body, as_of)
    is_snoozed = bool(snoozed and result.response["cards"] and (service is None or service.snoozable)
                      and snoozed(body, result))
    line = dict(result.response)
    if is_snoozed:
        line["cards"] = []
    if explain_it:
        line["patient"] = result.assessment.patient_id
        line["findings"] = explain(result.assessment)
        line["context"] = explain_context(result.assessment) | {"snoozed": is_snoozed}
    return line
