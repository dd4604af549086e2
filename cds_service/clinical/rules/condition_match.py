"""A cause's codes: the coded entries (conditions, procedures) the record has for it, one Evidence per concept
(copies of a re-recorded entry folded into it), split by role: `trigger` codes are evidence, `supporting` ones
context, and a suspected (rule-out, provisional) entry is listed apart, never firing on its own. A procedure that is
evidence only while recent, and codes that later results refute, are left out."""
from __future__ import annotations

from datetime import date, timedelta

from ...fhir.record import CodedEntry, PatientRecord
from ...knowledge.catalog import Catalog, Cause
from ..assessment import Evidence
from ..bone_context import coded_text
from .persistent_result import persistent_run


def coded_evidence(cause: Cause, rec: PatientRecord, catalog: Catalog) -> tuple[list[Evidence], list[Evidence], list[Evidence]]:
    """(evidence, supporting, suspected) from the cause's coded entries."""
    detect = cause.detect
    evidence: list[Evidence] = []
    supporting: list[Evidence] = []
    entries = rec.coded_by_cause.get(cause.id, ())
    if entries and detect.get("evidence_age"):
        # a procedure that is evidence only while recent (dialysis, chemotherapy); undated: not shown recent
        since = rec.as_of - timedelta(days=detect["evidence_age"]["procedures_within_days"])
        entries = [e for e in entries if e.resource_type != "Procedure" or (e.when is not None and e.when >= since)]
    if entries and detect.get("codes_refuted_by"):
        entries = _not_refuted(entries, detect["codes_refuted_by"], rec, catalog)
    suspected: list[Evidence] = []
    for group in _same_concept(entries):
        roles = {role for e in group for cid, role in e.matches if cid == cause.id}
        ev = Evidence(group[0].reference, coded_text(group[0], len(group), group[-1].when),
                      tuple(e.reference for e in group[1:]))
        if group[0].suspected:
            (suspected if "trigger" in roles else supporting).append(ev)
        else:
            (evidence if "trigger" in roles else supporting).append(ev)
    return evidence, supporting, suspected


def _not_refuted(entries, rule_id: str, rec: PatientRecord, catalog: Catalog) -> list[CodedEntry]:
    """Coded entries that later results do not refute: a CKD code recorded before a run of normal
    eGFR (after a transplant, or an old code never abated) no longer describes the patient."""
    rule = catalog.observation_rules[rule_id]
    run = persistent_run(rule, rec, rec.as_of - timedelta(days=rule.get("lookback_days", 365)))
    if not run:
        return list(entries)
    return [e for e in entries if e.when is not None and e.when >= run[0].when]


def _same_concept(entries) -> list[list[CodedEntry]]:
    """Copies of one condition or procedure (the same codes and name) grouped, oldest first: a chart that
    records it at every visit shows one line, not twenty."""
    groups: dict[tuple, list[CodedEntry]] = {}
    for e in entries:
        groups.setdefault((tuple(e.codes), e.text, e.historic, e.as_text, e.suspected), []).append(e)
    return [sorted(g, key=lambda e: e.when or date.min) for g in groups.values()]
