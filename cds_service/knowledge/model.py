"""The catalog as the engine sees it: causes, ingredients, code systems and the lookups the hot path calls.
Nothing here reads YAML or decides anything clinical."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import jinja2

from .codesets import CodeSet, icd_key


RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


SNOMED = "http://snomed.info/sct"


LOINC = "http://loinc.org"


ATC = "http://www.whocc.no/atc"


CPT = "http://www.ama-assn.org/go/cpt"


ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"


ICD9CM = "http://terminology.hl7.org/CodeSystem/icd9cm"


# Other spellings of the same code systems seen in EHR payloads (HL7 OIDs, casing, trailing slashes).
SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "http://hl7.org/fhir/sid/icd-10-cm/": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "http://snomed.info/sct/": SNOMED,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.12": CPT,
    "urn:oid:2.16.840.1.113883.6.4": ICD10PCS,
    "http://www.icd10data.com/icd10pcs": ICD10PCS,
    "urn:oid:2.16.840.1.113883.6.73": ATC,
    # ICD-9-CM: FHIR's canonical URI and its OIDs read as the spelling the value sets store
    "http://hl7.org/fhir/sid/icd-9-cm": ICD9CM,
    "http://hl7.org/fhir/sid/icd-9-cm/": ICD9CM,
    "urn:oid:2.16.840.1.113883.6.103": ICD9CM,
    "urn:oid:2.16.840.1.113883.6.2": ICD9CM,
    "http://www.nlm.nih.gov/research/umls/rxnorm/": RXNORM,
    "http://loinc.org/": LOINC,
    "http://www.ama-assn.org/go/cpt/": CPT,
    "urn:oid:2.16.840.1.113883.6.285": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
}


KNOWN_SYSTEMS = {RXNORM, ICD10CM, SNOMED, LOINC, ATC, CPT, ICD10PCS,
                 "http://terminology.hl7.org/CodeSystem/icd9cm",
                 "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
                 "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
                 "http://www.nlm.nih.gov/research/umls/hcpcs"}


class CatalogError(ValueError):
    """The catalog in cards/ is malformed: the service must not start with it. `problems` lists every
    problem found, one line each, as `cards/FILE:LINE: message`."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


_NORMALIZED: dict[str, str] = {}


def normalize_system(system: str | None) -> str:
    """The canonical URI for a code system (memoized: called for every coding on the hot path)."""
    if not system or not isinstance(system, str):
        return ""
    out = _NORMALIZED.get(system)
    if out is None:
        s = system.strip()
        out = SYSTEM_ALIASES.get(s, SYSTEM_ALIASES.get(s.lower(), s))
        if len(_NORMALIZED) < 10000:
            _NORMALIZED[system] = out
    return out


@dataclass(frozen=True)
class Ingredient:
    cause_id: str
    name: str
    prednisone_equivalent_factor: float | None = None
    counts_only_with_other_ingredients: bool = False


@dataclass
class Cause:
    id: str
    label: str
    category: str
    strength: str
    fires_alone: bool
    policy_reason: str
    citations: list[str]
    detect: dict
    workup: list[str]
    card: dict
    short_name: str
    not_with: tuple[str, ...] = ()          # more specific causes that, when found, replace this one
    quiet: dict = field(default_factory=dict)   # the cause's rule under the quiet firing policy
    variants: list[dict] = field(default_factory=list)    # named for what explains it (lithium-associated, ...)

    @property
    def medication_rule(self) -> dict | None:
        return self.detect.get("medications")


@dataclass
class Catalog:
    """Loaded, validated catalog with the indexes the engine uses per request."""

    version: str
    settings: dict
    statuses: dict
    causes: dict[str, Cause]
    citations: dict[str, dict]
    observation_rules: dict[str, dict]
    units: dict[str, dict]
    medication_settings: dict
    detection: dict
    card: dict
    value_sets: dict[str, dict]
    orders: dict = field(default_factory=dict)        # prescribing services (orders.yaml)
    # indexes, built once
    exact_codes: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)
    icd_prefixes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    med_codes: dict[tuple[str, str], list[Ingredient]] = field(default_factory=dict)
    med_name_regex: re.Pattern | None = None
    med_names: dict[str, list[Ingredient]] = field(default_factory=dict)
    loinc_rules: dict[str, list[str]] = field(default_factory=dict)
    context_loincs: set[str] = field(default_factory=set)
    non_systemic_regex: re.Pattern | None = None
    loinc_groups: dict[str, list[str]] = field(default_factory=dict)     # analyte -> every LOINC code for it
    single_dose_regex: re.Pattern | None = None
    condition_text_regex: re.Pattern | None = None        # every cause's text synonyms, longest first
    condition_text_causes: dict[str, list[str]] = field(default_factory=dict)   # synonym -> cause ids
    cues_before_regex: re.Pattern | None = None
    cues_after_regex: re.Pattern | None = None
    templates: dict[str, jinja2.Template] = field(default_factory=dict)
    frequency_patterns: list[tuple[re.Pattern, float]] = field(default_factory=list)
    therapy: dict = field(default_factory=dict)           # therapy.yaml: courses, drug safety, advice
    observation_names: dict = field(default_factory=dict)  # observations.yaml analyte_names
    code_sets: dict[str, CodeSet] = field(default_factory=dict)        # detection sections (pregnancy, ...)
    fracture_sites: dict[str, CodeSet] = field(default_factory=dict)   # site -> its fracture codes
    fracture_text_regex: re.Pattern | None = None                      # every site's text synonyms
    fracture_text_sites: dict[str, str] = field(default_factory=dict)  # synonym -> site
    fracture_procedure_regex: re.Pattern | None = None
    fracture_procedure_sites: dict[str, str] = field(default_factory=dict)
    section_text_regex: dict[str, re.Pattern] = field(default_factory=dict)   # section -> its text synonyms
    treatment_classes: dict[str, dict] = field(default_factory=dict)   # drug name -> therapy.yaml class
    osteoporotic_fracture_codes: CodeSet | None = None   # codes that say "osteoporotic fracture" (M80, Z87.310)
    analyte_name_regex: re.Pattern | None = None          # observations.yaml analyte_names, every name
    analyte_by_name: dict[str, str] = field(default_factory=dict)         # name -> analyte
    analyte_exclude_regex: dict[str, re.Pattern] = field(default_factory=dict)

    # ---- lookups used by the engine -------------------------------------------------
    @property
    def causes_reading_stopped_orders(self) -> set[str]:
        return {c.id for c in self.causes.values() if (c.medication_rule or {}).get("counts_stopped_orders")}

    def causes_for_code(self, system: str, code: str) -> list[tuple[str, str]]:
        """(cause_id, role) pairs a Condition/Procedure coding matches, prefixes included."""
        system = normalize_system(system)
        if not code:
            return []
        hits = list(self.exact_codes.get((system, code.strip()), ()))
        if system == ICD10CM:
            key = icd_key(code)
            hits += self.exact_codes.get((system, key), ())
            for n in range(3, len(key) + 1):
                hits += self.icd_prefixes.get(key[:n], ())
        return hits

    def ingredients_for_coding(self, system: str, code: str) -> list[Ingredient]:
        """The ingredients a drug code stands for, under every cause that names the same ingredient (a leuprolide
        product listed by the androgen-deprivation value set is leuprolide for ovarian suppression too)."""
        found = self.med_codes.get((normalize_system(system), (code or "").strip()), [])
        if not found:
            return []
        out = list(found)
        for ing in found:
            out += [other for other in self.med_names.get(ing.name, ()) if other not in out]
        return out

    def index_codes(self, group: str) -> list[dict]:
        """A bone-context group of detection.yaml (osteoporosis, fragility_fracture_history, ...): its own
        entries (prefix matches included), then the codes of the VSAC expansions named for it."""
        det = self.detection
        return list(det["index_conditions"].get(group, [])) + [
            c for oid in det.get("index_condition_value_sets", {}).get(group, []) for c in self.value_sets[oid]["codes"]]

    def section_codes(self, section: str) -> list[dict]:
        """The codes of a detection.yaml section that lists `codes` and `value_sets` (kidney_caution, pregnancy)."""
        spec = self.detection.get(section, {})
        return list(spec.get("codes", [])) + [c for oid in spec.get("value_sets", []) for c in self.value_sets[oid]["codes"]]

    def ingredients_in_text(self, text: str) -> list[Ingredient]:
        if not text or self.med_name_regex is None:
            return []
        out: list[Ingredient] = []
        for m in self.med_name_regex.finditer(text.lower()):
            out += self.med_names.get(m.group(0), ())
        return out


ICD_MAX_KEY = 8      # the longest ICD-10-CM code without its dot is 7 characters: longer prefixes never match


def icd_prefix_match(code: str, prefixes: set[str]) -> bool:
    """True when an ICD-10-CM code equals or descends from one of `prefixes` (dotless keys)."""
    key = icd_key(code)
    return any(key[:n] in prefixes for n in range(3, min(len(key), ICD_MAX_KEY) + 1))


def normalize_text(text: str) -> str:
    """Lower case, one kind of apostrophe, single spaces: how text synonyms and cues are compared."""
    return " ".join(text.lower().replace("\u2019", "'").replace("`", "'").split())


def words_regex(words) -> re.Pattern:
    """Any of the words or phrases as a whole word (a boundary only where the word starts or ends with a
    letter or digit: "?" matches in "?celiac"), longest first."""
    parts = []
    for w in sorted({normalize_text(w) for w in words}, key=len, reverse=True):
        if not w:
            continue
        parts.append(("(?<![a-z0-9])" if w[0].isalnum() else "") + re.escape(w) + ("(?![a-z0-9])" if w[-1].isalnum() else ""))
    return re.compile("|".join(parts) or "(?!)")
