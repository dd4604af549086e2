"""What the engine finds and what the card is built from: evidence, findings, fractures, the bone context, therapy
alerts, drug-safety conflicts, risk and the care plan. Value types only; the engine and the planners fill them."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from ..fhir.record import PatientRecord
from ..knowledge.catalog import Cause
from .therapy import Course, TherapyHistory

@dataclass
class Evidence:
    reference: str          # "ResourceType/id"
    text: str               # what, when, dose or value
    others: tuple[str, ...] = ()     # the other records a grouped line stands for ("24 records 2019-2026")
    numbers: dict | None = None      # what a summary line says, as numbers (glucocorticoid days and mg)


@dataclass
class Finding:
    cause: Cause
    evidence: list[Evidence]
    citations: list[str]
    tier: str | None = None
    supporting: list[Evidence] = field(default_factory=list)
    coded: bool = False              # a diagnosis or procedure code is among the evidence
    fires_alone: bool = True         # under the catalog's firing policy, for this patient
    warning: bool = False            # the quiet policy's warning condition holds
    first_seen: date | None = None   # the earliest date among its evidence (read for treated patients)
    suspected: bool = False          # only provisional / rule-out entries: listed, never firing on its own
    variant: dict | None = None      # the cause's variant that fits this patient (causes.yaml `variants`)

    @property
    def references(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.evidence:
            seen.setdefault(e.reference, None)
            for ref in e.others:
                seen.setdefault(ref, None)
        return list(seen)


@dataclass
class Fracture:
    """A fragility fracture on record: where, when, and whether its site makes it osteoporosis by itself."""
    reference: str
    text: str
    site: str                        # hip, vertebra, forearm, humerus, pelvis, unspecified
    major: bool                      # hip or vertebra: osteoporosis whatever the T-score (AACE 2020, BHOF 2022)
    when: date | None
    osteoporotic: bool = False       # the code itself says osteoporotic (M80, Z87.310): a fragility fracture at any site


@dataclass
class BoneContext:
    bone_diagnoses: list[Evidence] = field(default_factory=list)
    osteoporosis: list[Evidence] = field(default_factory=list)       # diagnosis codes
    fractures: list[Fracture] = field(default_factory=list)          # fragility fractures, healed ones included
    normal_bmd_fractures: list[Fracture] = field(default_factory=list)   # non-hip/vertebral with a normal T-score
    low_t_score: Evidence | None = None                              # latest DXA's lowest T-score, when <= the cut-off
    latest_t_score: tuple[float, str, date] | None = None            # (value, site, date) of the latest DXA's lowest
    latest_z_score: tuple[float, str, date] | None = None
    low_z_score: Evidence | None = None                              # young adults: Z-score at or below the cut-off
    young_adult: bool = False                                        # premenopausal woman or man under 50 (ISCD)
    last_dxa: date | None = None
    dxa_evidence: Evidence | None = None
    therapy: TherapyHistory = field(default_factory=TherapyHistory)
    treated: list[Course] = field(default_factory=list)              # courses that make the patient "on therapy"
    treatments: list[Evidence] = field(default_factory=list)         # their records, in words
    next_decision: str | None = None                                 # drug holiday review, denosumab dose due
    workup_done: dict[str, Evidence] = field(default_factory=dict)
    latest_egfr: tuple[float, date, str] | None = None               # (value, date, reference)
    latest_frax: tuple[float, date] | None = None                    # FRAX major osteoporotic, % (2 years)
    kidney_caution: list[Evidence] = field(default_factory=list)     # why antiresorptives need care
    pregnant: Evidence | None = None
    lactating: Evidence | None = None
    end_of_life: Evidence | None = None                              # hospice, terminal or comfort care
    deceased: bool = False
    sections: dict[str, list[Evidence]] = field(default_factory=dict)   # other context sets on record (menopause, ...)
    alerts_replace_gap: bool = False                                 # an overdue denosumab or an unfollowed anabolic

    @property
    def courses(self) -> list[Course]:
        """The courses the patient is on (treated), newest start first."""
        return sorted(self.treated, key=lambda c: c.start, reverse=True)

    @property
    def gap_fractures(self) -> list[Fracture]:
        return [f for f in self.fractures if f not in self.normal_bmd_fractures]

    @property
    def low_bmd(self) -> Evidence | None:
        """Low bone density as this patient is read: a T-score from 50 or after menopause, a Z-score before."""
        return self.low_z_score if self.young_adult else self.low_t_score

    @property
    def bone_kind(self) -> str:
        """What is on record: "osteoporosis", "fracture", "both" or (a young adult by Z-score) "low_for_age"."""
        low_bmd = bool(self.osteoporosis or self.low_bmd)
        if self.young_adult and not self.osteoporosis and self.low_z_score and not self.gap_fractures:
            return "low_for_age"
        return "both" if low_bmd and self.gap_fractures else "fracture" if self.gap_fractures else "osteoporosis"

    @property
    def treatment_gap(self) -> bool:
        """Osteoporosis or a fragility fracture on record and no osteoporosis medicine (an overdue denosumab dose or
        an anabolic course with no follow-on is its own, more specific alert)."""
        return bool(self.osteoporosis or self.gap_fractures or self.low_bmd) and not self.treated \
            and not self.alerts_replace_gap


@dataclass
class Assessment:
    patient_id: str
    as_of: date
    in_scope: bool
    findings: list[Finding]
    context: BoneContext
    record: PatientRecord

    @property
    def triggering(self) -> list[Finding]:
        return [f for f in self.findings if f.fires_alone]

    @property
    def listed(self) -> list[Finding]:
        return [f for f in self.findings if not f.fires_alone]

    care: "CarePlan | None" = None

    @property
    def known_before_treatment(self) -> list[Finding]:
        """For a patient on osteoporosis therapy (and no treatment gap): the firing causes already on record
        before the current therapy began. The card leads with those that appeared since."""
        ctx = self.context
        if not ctx.courses or ctx.treatment_gap:
            return []
        since = min(c.start for c in ctx.courses)
        return [f for f in self.triggering if f.first_seen is not None and f.first_seen < since]

    @property
    def silenced(self) -> str | None:
        """Why no card may go to this patient at all: "deceased", "end_of_life" (hospice, comfort care), or None."""
        ctx = self.context
        return "deceased" if ctx.deceased else "end_of_life" if ctx.end_of_life else None

    @property
    def card_due(self) -> bool:
        """A cause that fires on its own, untreated osteoporosis (also with no cause recorded: unexplained
        osteoporosis is the classic indication for the secondary-cause workup), a therapy alert or a drug-safety
        conflict, or many contributors in an older patient with no DXA; never for a deceased patient or in hospice."""
        if not self.in_scope or self.silenced:
            return False
        care = self.care
        return bool(self.triggering) or self.context.treatment_gap or bool(
            care and (care.alerts or care.conflicts or care.screening or care.normal_bmd_note or care.also))

    def cited_references(self) -> set[str]:
        """Resources that drive a finding or the card's wording: findings' evidence, bone
        diagnoses, osteoporosis treatment and the last DXA. (Recently resulted workup labs only
        keep a test from being offered again, and are not validated.)"""
        refs = {ref for f in self.findings for e in f.evidence + f.supporting for ref in (e.reference, *e.others)}
        ctx = self.context
        refs |= {e.reference for e in ctx.bone_diagnoses + ctx.treatments + ctx.kidney_caution + ctx.fractures}
        for e in (ctx.low_t_score, ctx.low_z_score, ctx.pregnant, ctx.lactating, ctx.dxa_evidence):
            if e is not None:
                refs.add(e.reference)
        for c in ctx.treated:
            refs.update(c.references)
        if self.care:
            refs |= {ref for alert in self.care.alerts for ref in alert.references}
            refs |= {ref for c in self.care.conflicts for ref in c.references}
        return refs


@dataclass
class TherapyAlert:
    """Something about the patient's osteoporosis therapy that needs action now (therapy.yaml wording)."""
    kind: str                        # denosumab_overdue, anabolic_no_follow_on, treatment_failure
    summary: str
    detail: str
    citations: list[str]
    references: list[str]
    warning: bool = True


@dataclass
class Conflict:
    """A drug-safety rule that holds for a bone drug (on record, or a draft)."""
    rule: str                        # therapy.yaml safety rule id
    drug: str
    text: str
    citations: list[str]
    references: list[str]


@dataclass
class Risk:
    level: str                       # very_high, high (AACE 2020); or an ACR 2022 glucocorticoid stratum
    label: str
    reasons: list[str]
    citation: str


@dataclass
class AdviceLine:
    id: str
    text: str
    citations: list[str]
    no_drug_drafts: bool = False
    short: str = ""                  # the reason in a few words
    summary: str = ""                # the gap card's summary when this line holds ({bone})


@dataclass
class CarePlan:
    """What the record means for treatment: risk, the treatment line, alerts about therapy, drug-safety conflicts."""
    risk: Risk | None = None                     # AACE 2020 (with low bone density or a fracture)
    gc_risk: Risk | None = None                  # ACR 2022, when long-term glucocorticoids are found
    gc_line: AdviceLine | None = None
    line: AdviceLine | None = None               # the treatment line for this patient
    also: list[AdviceLine] = field(default_factory=list)
    alerts: list[TherapyAlert] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)      # for drugs the patient is on
    screening: bool = False                      # many contributors, an older patient, no DXA: DXA and FRAX
    normal_bmd_note: str | None = None           # a non-hip/vertebral fracture with a normal T-score
