"""The clinical catalog in cards/: loaded once, validated loudly, indexed for the hot path.

Everything clinical (causes, codes, thresholds, wording) lives in YAML so that a reviewer can
change it without touching Python. This module turns it into lookup tables; it never decides
anything clinical itself.
"""
from __future__ import annotations

import contextvars
import pickle
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jsonschema
import yaml

from .codesets import SECTIONS, CodeSet, icd_key

# libyaml's C loader when present (several times faster start-up); same safe semantics
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

def _default_cards_dir() -> Path:
    """cards/ beside the package in a source checkout; the package data an installed wheel carries."""
    checkout = Path(__file__).resolve().parents[2] / "cards"
    if (checkout / "catalog.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parents[1] / "content"


DEFAULT_CARDS_DIR = _default_cards_dir()

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
STRENGTHS = ("strong", "moderate", "weak")
# where a code beyond the reference comes from: a Synthea module (cards/sources/synthea-codes.tsv)
# or a published VSAC expansion stored in value_sets.yaml
# or the ICD-10-CM tabular list itself (icd10cm:YEAR: the CMS April release, checked by the catalog test)
CODE_SOURCES = ("synthea:", "vsac:", "icd10cm:")
MED_RULES = {"glucocorticoid_exposure", "sustained_use", "any_use", "current_use_with_lab", "high_dose", "recent_use"}
LOINC_KEYS = ("loinc", "calcium_loinc", "albumin_loinc", "pth_loinc", "weight_loinc", "height_loinc",
              "creatinine_loinc")
OBS_KINDS = {"threshold", "pth_calcium", "persistent", "bmi", "smoking", "dexamethasone_suppression"}


class CatalogError(ValueError):
    """The catalog in cards/ is malformed: the service must not start with it. `problems` lists every
    problem found, one line each, as `cards/FILE:LINE: message`."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class _Problems:
    """Problems found while loading, collected so that all of them are reported at once."""

    def __init__(self, base: Path):
        self.base = base
        self.items: list[str] = []
        self.lines: dict[str, dict[tuple, int]] = {}       # file -> path in the document -> line
        self.anchors: dict[str, tuple[str, int]] = {}       # "causes.yaml cause ckd" -> (file, line)

    def add(self, file: str, line: int | None, message: str) -> None:
        where = f"cards/{file}:{line}" if line else f"cards/{file}"
        self.items.append(f"{where}: {message}")

    def where(self, where: str, message: str) -> None:
        """A semantic problem named by its `where` ("causes.yaml cause ckd"), placed on its line."""
        file, line = self.anchors.get(where, (where.split(" ", 1)[0], None))
        rest = where.split(" ", 1)[1] if " " in where else ""
        self.add(file, line, f"{rest}: {message}" if rest else message)

    def raise_if_any(self) -> None:
        if self.items:
            raise CatalogError(f"{len(self.items)} problem(s) in the catalog:\n" + "\n".join(self.items), self.items)


_problems: contextvars.ContextVar[_Problems | None] = contextvars.ContextVar("catalog_problems", default=None)


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


def _read(path: Path, problems: _Problems | None = None) -> Any:
    """Parse one YAML file. With `problems`: record each value's line (for messages) and every
    duplicated key (which YAML would otherwise resolve silently, the last one winning)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CatalogError(f"missing catalog file {path}") from exc
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if problems is not None and node is not None:
                lines: dict[tuple, int] = {}
                # value_sets.yaml holds thousands of imported codes: its entries' insides are checked in Python
                _walk_nodes(node, (), lines, path.name, problems, 3 if path.name == "value_sets.yaml" else 99)
                problems.lines[path.name] = lines
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = getattr(exc, "problem", None) or "not valid YAML"
        if problems is None:
            raise CatalogError(f"{path.name}: not valid YAML: {exc}") from exc
        problems.add(path.name, mark.line + 1 if mark else None, f"not valid YAML: {what}")
        return None


def _walk_nodes(node, path: tuple, lines: dict, file: str, problems: _Problems, depth: int) -> None:
    lines[path] = node.start_mark.line + 1
    if depth == 0:
        return
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.add(file, key_node.start_mark.line + 1,
                             f"duplicate key {key!r} (first at line {seen[key]}): YAML would keep only the last")
            seen[key] = key_node.start_mark.line + 1
            _walk_nodes(value_node, path + (key,), lines, file, problems, depth - 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_nodes(item, path + (i,), lines, file, problems, depth - 1)


def _template_problem(file: str, path: tuple, name: str, exc: jinja2.TemplateError) -> None:
    """A template error on the line of the file where it is: the template's first line (the one after `|` for a
    block) plus the line Jinja names."""
    collecting = _problems.get()
    if collecting is None:
        raise CatalogError(f"{file} {name}: template: {exc}")
    start = collecting.lines.get(file, {}).get(path)
    lineno = getattr(exc, "lineno", None)
    line = start + lineno if start and lineno else start
    collecting.add(file, line, f"{name}: template: {exc.message or exc}")


def _check_everywhere(raw: dict, manifest: dict, citations: set[str], problems: _Problems) -> None:
    """What a typo anywhere in the catalog could hide: every `system` is a code system the catalog knows, by its
    canonical URI (a near miss is named with the one likely meant), and every citation id, under `citations`,
    `citation` or a bare-id `source`, is in citations.yaml."""
    import difflib

    canonical = sorted(KNOWN_SYSTEMS)

    def walk(file: str, node: Any, path: tuple) -> None:
        if isinstance(node, dict):
            system = node.get("system")
            own = path[-1:] == ("override_reasons",)             # the service's own code system for its reasons
            if isinstance(system, str) and system not in KNOWN_SYSTEMS and not own:
                meant = SYSTEM_ALIASES.get(system) or next(iter(difflib.get_close_matches(system, canonical, 1, 0.8)), None)
                hint = f" (did you mean {meant!r}?)" if meant else f" (known: {', '.join(canonical[:7])}, ...)"
                problems.add(file, _line(file, path + ("system",)), f"unknown code system {system!r}{hint}")
            for key, value in node.items():
                for c in _citation_ids(file, key, value):
                    if c not in citations:
                        problems.add(file, _line(file, path + (key,)), f"{key}: unknown citation id {c!r}")
                walk(file, value, path + (key,))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(file, item, path + (i,))

    def _line(file: str, path: tuple) -> int | None:
        lines = problems.lines.get(file, {})
        return next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)

    walk("catalog.yaml", manifest, ())
    for name, data in raw.items():
        walk(f"{name}.yaml", data, ())


_CITATION_ID = re.compile(r"[a-z][a-z0-9_]{1,40}")
_SOURCE_KINDS = {"reference", "derived"}       # a code's provenance, not a citation


def _citation_ids(file: str, key: str, value: Any) -> list[str]:
    """The citation ids a catalog entry names: `citations: [...]`, `citation: id`, and a `source` that is a bare id
    (not "reference", "derived", "vsac:...", free text, or the sources of citations.yaml itself)."""
    if key == "citations" and isinstance(value, list):
        return [c for c in value if isinstance(c, str)]
    if key == "citation" and isinstance(value, str):
        return [value]
    if key == "source" and file != "citations.yaml" and isinstance(value, str) and _CITATION_ID.fullmatch(value) \
            and value not in _SOURCE_KINDS:
        return [value]
    return []


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        collecting = _problems.get()
        if collecting is None:
            raise CatalogError(f"{where}: {msg}")
        collecting.where(where, msg)


def _schema_problems(file: str, data: Any, problems: _Problems) -> None:
    """Unknown keys, wrong types and out-of-range numbers, each on its line."""
    schema = _catalog_schema()
    validator = jsonschema.Draft202012Validator({**schema["files"][file], "$defs": schema["$defs"]})
    lines = problems.lines.get(file, {})
    found: list[tuple[int, str]] = []
    for error in validator.iter_errors(data):
        path = tuple(error.absolute_path)
        line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            # point at the unknown key itself
            allowed = set(error.schema.get("properties", {}))
            for key in error.instance:
                if key not in allowed and (path + (key,)) in lines:
                    line = lines[path + (key,)]
        label = _path_label(data, path)
        message = error.message if len(error.message) < 300 else error.message[:300] + "..."
        found.append((line or 0, f"{label}: {message}"))
    for line, message in sorted(found):
        problems.add(file, line or None, message)


def _path_label(data: Any, path: tuple) -> str:
    """causes[ckd].detect.medications.min_days: list items named by their id where they have one."""
    out, node = "", data
    for step in path:
        if isinstance(step, int):
            item = node[step] if isinstance(node, list) and step < len(node) else None
            out += f"[{item['id']}]" if isinstance(item, dict) and isinstance(item.get("id"), str) else f"[{step}]"
            node = item
        else:
            out += ("." if out else "") + str(step)
            node = node.get(step) if isinstance(node, dict) else None
    return out or "(top level)"


@lru_cache(maxsize=1)
def _catalog_schema() -> dict:
    return yaml.load((Path(__file__).parent / "catalog_schema.yaml").read_text(encoding="utf-8"), Loader=_Loader)


def _check_code(entry: Any, where: str) -> None:
    _require(isinstance(entry, dict), where, "code entry must be a mapping")
    _require(isinstance(entry.get("code"), str) and entry["code"].strip() != "", where, "code must be a non-empty string")
    _require(entry.get("system") in KNOWN_SYSTEMS, where, f"unknown code system {entry.get('system')!r}")
    _require(isinstance(entry.get("verified"), bool), where, f"code {entry['code']} needs verified: true/false")
    _require(entry.get("match", "exact") in ("exact", "prefix"), where, f"code {entry['code']}: match must be exact or prefix")
    _require(entry.get("role", "trigger") in ("trigger", "supporting"), where, f"code {entry['code']}: bad role")
    if entry.get("match") == "prefix":
        _require(entry["system"] == ICD10CM, where, f"prefix match is only for ICD-10-CM ({entry['code']})")
    source = entry.get("source", "reference")
    _require(isinstance(source, str) and (source == "reference" or source.startswith(CODE_SOURCES)), where,
             f"code {entry['code']}: source must be 'reference' or start with one of {CODE_SOURCES}")


FILES = ("causes", "observations", "medications", "detection", "value_sets", "citations", "card", "orders",
         "therapy")


def load_catalog(cards_dir: str | Path | None = None) -> Catalog:
    """Load and validate cards/. Every problem is collected and raised at once (CatalogError.problems),
    each as `cards/FILE:LINE: message`: YAML syntax, duplicate keys, the schema (unknown keys, types,
    numbers), then cross-references and templates."""
    base = Path(cards_dir) if cards_dir else DEFAULT_CARDS_DIR
    problems = _Problems(base)
    stamp = _files_stamp(base)
    cached = _VALIDATED.get(stamp) if stamp else None
    if cached is not None:                          # the same files, parsed and checked before
        manifest, raw, problems.lines, problems.anchors = pickle.loads(cached)
    else:
        manifest, raw = _read_and_check(base, problems)
        _check_everywhere(raw, manifest, {c["id"] for c in raw["citations"]["citations"] if isinstance(c, dict)}, problems)
        blob = pickle.dumps((manifest, raw, problems.lines, problems.anchors)) if stamp else None
    token = _problems.set(problems)
    try:
        catalog = _build(base, manifest, raw)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        if not problems.items:
            problems.add("catalog.yaml", None, f"cannot be read: {type(exc).__name__} {exc}")
        catalog = None
    finally:
        _problems.reset(token)
    problems.raise_if_any()
    if stamp and cached is None:
        _VALIDATED.clear()                          # one catalog per folder state is enough
        _VALIDATED[stamp] = blob
    return catalog


# Parsing with line tracking and the schema check take about a second; an app or test that loads the same,
# unchanged files again (same size and modification time) reuses them. The Catalog is built fresh each time.
_VALIDATED: dict[tuple, bytes] = {}


def _files_stamp(base: Path) -> tuple | None:
    try:
        stats = [(name, (base / name).stat()) for name in ["catalog.yaml"] + [f"{k}.yaml" for k in FILES]]
    except OSError:
        return None                                 # a missing file: the full read says which
    return (str(base.resolve()),) + tuple((n, st.st_mtime_ns, st.st_size) for n, st in stats)


def _read_and_check(base: Path, problems: _Problems) -> tuple[dict, dict]:
    manifest = _read(base / "catalog.yaml", problems)
    raw = {k: _read(base / f"{k}.yaml", problems) for k in FILES}
    if manifest is None or any(v is None for v in raw.values()):
        problems.raise_if_any()                     # a file that does not parse: nothing else can be checked
    for name, data in [("catalog.yaml", manifest)] + [(f"{k}.yaml", raw[k]) for k in FILES]:
        _schema_problems(name, data, problems)
    problems.raise_if_any()
    for file, kind, items, key in (("causes.yaml", "cause", raw["causes"]["causes"], ("causes",)),
                                   ("observations.yaml", "rule", raw["observations"]["rules"], ("rules",))):
        for i, item in enumerate(items):
            problems.anchors[f"{file} {kind} {item.get('id')}"] = (file, problems.lines[file].get(key + (i,)))
    for tier, items in raw["detection"]["workup"].items():
        for i, item in enumerate(items):
            problems.anchors[f"detection.yaml workup {item.get('id')}"] = (
                "detection.yaml", problems.lines["detection.yaml"].get(("workup", tier, i)))
    return manifest, raw


def _build(base: Path, manifest: dict, raw: dict) -> Catalog:

    citations = {c["id"]: c for c in raw["citations"]["citations"]}
    value_sets = {v["oid"]: v for v in raw["value_sets"]["value_sets"]}
    for oid, vs in value_sets.items():
        bad = [c for c in vs["codes"] if not (isinstance(c, dict) and isinstance(c.get("system"), str)
                                              and isinstance(c.get("code"), str) and c["code"]
                                              and set(c) <= {"system", "code", "display"})]
        _require(not bad, f"value_sets.yaml {oid}", f"{len(bad)} code entries are not {{system, code, display}} strings")
    card_cfg = raw["card"]
    obs_cfg = raw["observations"]
    units = obs_cfg["units"]
    groups = {name: [c["code"] for c in entries] for name, entries in (obs_cfg.get("loinc_groups") or {}).items()}
    for analyte, spec in (obs_cfg.get("analyte_names") or {}).items():
        _require(spec["group"] in groups, "observations.yaml analyte_names", f"{analyte}: unknown loinc group {spec['group']}")
    obs_rules: dict[str, dict] = {}
    for rule in obs_cfg["rules"]:
        where = f"observations.yaml rule {rule.get('id')}"
        for key in LOINC_KEYS:                  # a group name stands for every LOINC code of the analyte
            if isinstance(rule.get(key), str):
                _require(rule[key] in groups, where, f"{key}: unknown loinc group {rule[key]}")
                rule[key] = list(groups[rule[key]])
        _require(rule.get("kind") in OBS_KINDS, where, f"kind must be one of {sorted(OBS_KINDS)}")
        _require(rule["id"] not in obs_rules, where, "duplicate id")
        if rule.get("analyte"):
            _require(rule["analyte"] in units, where, f"unknown analyte {rule['analyte']}")
        for c in rule.get("citations", []):
            _require(c in citations, where, f"unknown citation {c}")
        obs_rules[rule["id"]] = rule

    detection = raw["detection"]
    workup_items = {w["id"]: w for tier in detection["workup"].values() for w in tier}
    for wid, w in workup_items.items():
        where = f"detection.yaml workup {wid}"
        codes = {c["code"]: c for c in w["codes"]}
        for c in w["codes"]:
            _check_code(c, where)
        for oc in w.get("order", []):
            _require(oc in codes, where, f"order code {oc} is not one of the item's codes")
            _require(codes[oc]["verified"], where, f"order code {oc} is not verified: never order an unverified code")

    for key in SECTIONS:
        for c in detection.get(key, {}).get("codes", []):
            _check_code(c, f"detection.yaml {key}")
        for oid in detection.get(key, {}).get("value_sets", []):
            _require(oid in value_sets, f"detection.yaml {key}", f"unknown value set {oid}")
        for c in detection.get(key, {}).get("citations", []):
            _require(c in citations, f"detection.yaml {key}", f"unknown citation {c}")
    for site, spec in detection.get("fractures", {}).get("sites", {}).items():
        for c in spec.get("codes", []):
            _check_code(c, f"detection.yaml fractures.sites.{site}")
    for c in detection.get("fractures", {}).get("citations", []):
        _require(c in citations, "detection.yaml fractures", f"unknown citation {c}")
    for group, oids in (detection.get("index_condition_value_sets") or {}).items():
        _require(group in detection["index_conditions"], "detection.yaml index_condition_value_sets",
                 f"unknown group {group}")
        for oid in oids:
            _require(oid in value_sets, "detection.yaml index_condition_value_sets", f"unknown value set {oid}")
    pol = detection.get("workup_policy") or {}
    where = "detection.yaml workup_policy"
    for key in ("core", "extended", "with_calcium"):
        for wid in pol.get(key, []):
            _require(wid in workup_items, where, f"{key}: unknown workup item {wid}")
    for key in ("min_age", "key_components", "not_with_findings"):
        for wid in pol.get(key, {}):
            _require(wid in workup_items, where, f"{key}: unknown workup item {wid}")
    for key, item in (("calcium_order", "wk_cmp"), ("forearm_dxa_order", "wk_dxa")):
        if key in pol:
            codes = {c["code"]: c for c in workup_items[item]["codes"]}
            _require(pol[key] in codes and codes[pol[key]]["verified"], where,
                     f"{key} must be a verified code of {item}")
    for key in ("treatment_gap", "kidney_caution"):
        for c in detection.get(key, {}).get("citations", []):
            _require(c in citations, f"detection.yaml {key}", f"unknown citation {c}")
    for c in pol.get("citations", []) + pol.get("vfa", {}).get("citations", []):
        _require(c in citations, where, f"unknown citation {c}")
    short_names = card_cfg.get("short_names", {})
    causes: dict[str, Cause] = {}
    for entry in raw["causes"]["causes"]:
        cid = entry.get("id")
        where = f"causes.yaml cause {cid}"
        _require(isinstance(cid, str) and re.fullmatch(r"[a-z0-9_]+", cid or "") is not None, where, "id must be snake_case")
        _require(cid not in causes, where, "duplicate id")
        for key in ("label", "category", "strength", "policy", "citations", "detect", "card"):
            _require(key in entry, where, f"missing {key}")
        _require(entry["strength"] in STRENGTHS, where, f"strength must be one of {STRENGTHS}")
        _require(bool(entry["citations"]), where, "every rule needs a citation")
        for c in entry["citations"] + entry["card"].get("citations", []):
            _require(c in citations, where, f"unknown citation {c}")
        detect = entry["detect"]
        _require(any(k in detect for k in ("codes", "medications", "observations", "value_sets", "procedure_text")),
                 where, "detect needs codes, medications, observations, value_sets or procedure_text")
        for c in detect.get("codes", []):
            _check_code(c, where)
        for oid in detect.get("value_sets", []):
            _require(oid in value_sets, where, f"unknown value set {oid}")
        for rid in detect.get("observations", []):
            _require(rid in obs_rules, where, f"unknown observation rule {rid}")
        if "codes_refuted_by" in detect:
            rid = detect["codes_refuted_by"]
            _require(obs_rules.get(rid, {}).get("kind") == "persistent", where,
                     f"codes_refuted_by must name a persistent observation rule, not {rid!r}")
        med = detect.get("medications")
        if med:
            _require(med.get("rule") in MED_RULES, where, f"medications.rule must be one of {sorted(MED_RULES)}")
            _require(bool(med.get("ingredients")), where, "medications need ingredients")
            for ing in med["ingredients"] + med.get("excluded_ingredients", []):
                _require(bool(ing.get("name")), where, "ingredient needs a name")
                if ing.get("rxnorm"):
                    _require(isinstance(ing["rxnorm"].get("verified"), bool), where, f"{ing['name']}: rxnorm needs verified")
            for p in med.get("products", []):
                _check_code(p, where)
            if med["rule"] == "recent_use":
                _require(isinstance(med.get("within_days"), int) and med["within_days"] > 0, where,
                         "recent_use needs within_days (a whole number of days)")
            if med["rule"] == "current_use_with_lab":
                _require(med.get("requires_observation") in obs_rules, where, "requires_observation must name a rule")
            if med["rule"] == "glucocorticoid_exposure":
                for ing in med["ingredients"]:
                    f = ing.get("prednisone_equivalent_factor")
                    _require(f is None or (isinstance(f, (int, float)) and f > 0), where,
                             f"{ing['name']}: prednisone_equivalent_factor must be a positive number")
        for wid in entry.get("workup", []):
            _require(wid in workup_items, where, f"unknown workup item {wid}")
        _require(cid in short_names, where, "card.yaml short_names has no entry for this cause")
        policy = entry["policy"]
        _require(isinstance(policy.get("fires_alone"), bool), where, "policy.fires_alone must be true/false")
        _require(policy["fires_alone"] or bool(policy.get("reason")), where, "a cause that never fires alone needs a reason")
        quiet = policy.get("quiet") or {}        # its shape is the schema's (catalog_schema.yaml)
        not_with = policy.get("not_with", [])
        _require(not not_with or bool(policy.get("not_with_reason")), where, "policy.not_with needs a not_with_reason")
        causes[cid] = Cause(
            id=cid, label=entry["label"], category=entry["category"], strength=entry["strength"],
            fires_alone=policy["fires_alone"], policy_reason=policy.get("reason", ""),
            citations=entry["citations"], detect=detect, workup=entry.get("workup", []),
            card=entry["card"], short_name=short_names[cid], not_with=tuple(not_with), quiet=quiet,
            variants=entry.get("variants", []),
        )
        for v in entry.get("variants", []):
            for c in v.get("citations", []):
                _require(c in citations, where, f"variant {v['id']}: unknown citation {c}")

    for cause in causes.values():
        for v in cause.variants:
            for other in v["when"].get("with_causes", []):
                _require(other in causes, f"causes.yaml cause {cause.id}", f"variant {v['id']}: unknown cause {other}")
            for med in v["when"].get("with_context_medications", []):
                _require(med in detection.get("context_medications", {}), f"causes.yaml cause {cause.id}",
                         f"variant {v['id']}: unknown context medication {med}")
    for wid, found in (detection.get("workup_policy") or {}).get("not_with_findings", {}).items():
        for cid in found:
            _require(cid in causes, "detection.yaml workup_policy", f"not_with_findings.{wid}: unknown cause {cid}")
    order_labels = card_cfg.get("order_labels", {})
    for wid, item in workup_items.items():
        for code in item.get("order", []):
            _require(code in order_labels, "card.yaml order_labels", f"no short label for order code {code} ({wid})")
    for cause in causes.values():
        for other in cause.not_with:
            _require(other in causes, f"causes.yaml cause {cause.id}", f"policy.not_with: unknown cause {other}")
    catalog = Catalog(
        version=str(manifest["catalog"]["version"]), settings=manifest.get("scope", {}),
        statuses=manifest.get("statuses", {}), causes=causes, citations=citations,
        observation_rules=obs_rules, units=units, medication_settings=raw["medications"],
        detection=detection, card=card_cfg, value_sets=value_sets, loinc_groups=groups, orders=raw["orders"],
        therapy=raw["therapy"], observation_names=obs_cfg.get("analyte_names") or {},
    )
    _check_orders(catalog)
    _check_therapy(catalog)
    _build_indexes(catalog)
    return catalog


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


def _build_indexes(cat: Catalog) -> None:
    def add_code(system: str, code: str, cause_id: str, role: str, prefix: bool) -> None:
        system = normalize_system(system)
        if prefix:
            cat.icd_prefixes.setdefault(icd_key(code), []).append((cause_id, role))
        else:
            key = icd_key(code) if system == ICD10CM else code
            cat.exact_codes.setdefault((system, key), []).append((cause_id, role))

    names: dict[str, list[Ingredient]] = {}
    for cause in cat.causes.values():
        for c in cause.detect.get("codes", []):
            add_code(c["system"], c["code"], cause.id, c.get("role", "trigger"), c.get("match") == "prefix")
        med = cause.medication_rule
        explicit = {c["code"] for c in cause.detect.get("codes", [])}
        for oid in cause.detect.get("value_sets", []):
            for c in cat.value_sets[oid]["codes"]:
                if c["code"] in explicit:
                    continue            # the cause's own entry (and its role) wins over a broad value set
                if med and normalize_system(c["system"]) == RXNORM:
                    ing = _ingredient_for_product(med, cause.id, c.get("display", ""))
                    if ing is not None:
                        cat.med_codes.setdefault((RXNORM, c["code"]), []).append(ing)
                else:
                    add_code(c["system"], c["code"], cause.id, "trigger", False)
        if not med:
            continue
        for ing in med["ingredients"]:
            ingredient = Ingredient(cause.id, ing["name"], ing.get("prednisone_equivalent_factor"),
                                    bool(ing.get("counts_only_with_other_ingredients")))
            if ing.get("rxnorm", {}).get("code"):
                cat.med_codes.setdefault((RXNORM, ing["rxnorm"]["code"]), []).append(ingredient)
            if ing.get("atc", {}).get("code"):
                cat.med_codes.setdefault((ATC, ing["atc"]["code"]), []).append(ingredient)
            for term in [ing["name"], *ing.get("other_names", []), *ing.get("brands", [])]:
                names.setdefault(term.lower(), []).append(ingredient)
        for p in med.get("products", []):
            ing = _ingredient_for_product(med, cause.id, p.get("display", ""))
            if ing is not None:
                cat.med_codes.setdefault((RXNORM, p["code"]), []).append(ing)
    # treatment detection reuses the same machinery under a pseudo cause id
    for ing in cat.detection["osteoporosis_treatment"]["ingredients"]:
        ingredient = Ingredient("osteoporosis_treatment", ing["name"])
        if ing.get("rxnorm", {}).get("code"):
            cat.med_codes.setdefault((RXNORM, ing["rxnorm"]["code"]), []).append(ingredient)
        if ing.get("atc", {}).get("code"):
            cat.med_codes.setdefault((ATC, ing["atc"]["code"]), []).append(ingredient)
        for term in [ing["name"], *ing.get("other_names", []), *ing.get("brands", [])]:
            for part in re.split(r"\s*/\s*", term.lower()):
                names.setdefault(part, []).append(ingredient)
    treatment_names = [ing["name"] for ing in cat.detection["osteoporosis_treatment"]["ingredients"]]
    for c in cat.detection["osteoporosis_treatment"]["other_codes"]:
        if normalize_system(c["system"]) == RXNORM:
            # a product code stands for the treatment whose name parts its display carries ("bazedoxifene ...")
            display = c.get("display", c["code"]).lower()
            name = next((n for n in treatment_names if any(_has_word(part, display) for part in re.split(r"\s*/\s*", n)
                                                           if len(part) > 6)), display)
            cat.med_codes.setdefault((RXNORM, c["code"]), []).append(Ingredient("osteoporosis_treatment", name))
    for group, spec in (cat.detection.get("context_medications") or {}).items():
        for term in spec["names"]:
            names.setdefault(term.lower(), []).append(Ingredient(f"context:{group}", term.lower()))
    cat.med_names = names
    # longest names first so 'valproic acid' wins over a shorter overlapping term
    terms = sorted(names, key=len, reverse=True)
    cat.med_name_regex = re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(t) for t in terms) + r")(?![a-z0-9])")

    for rule in cat.observation_rules.values():
        for key in LOINC_KEYS:
            for code in rule.get(key, []):
                cat.loinc_rules.setdefault(code, []).append(rule["id"])
    dxa = cat.detection["existing_dxa"]
    for kind in ("t_score", "z_score", "bmd_area_density", "study", "frax"):
        cat.context_loincs.update(c["code"] for c in dxa.get(kind, []))
    for tier in cat.detection["workup"].values():
        for w in tier:
            cat.context_loincs.update(c["code"] for c in w["codes"] if normalize_system(c["system"]) == LOINC)
    for groups in cat.detection.get("workup_policy", {}).get("key_components", {}).values():
        for group in groups:
            cat.context_loincs.update(group)

    det = cat.detection
    for section in SECTIONS:
        cat.code_sets[section] = CodeSet.of(section, cat.section_codes(section), normalize_system)
        if det.get(section, {}).get("condition_text"):
            cat.section_text_regex[section] = words_regex(det[section]["condition_text"])
    for analyte, spec in (cat.observation_names or {}).items():
        for w in spec["names"]:
            cat.analyte_by_name[normalize_text(w)] = analyte
        if spec.get("exclude"):
            cat.analyte_exclude_regex[analyte] = re.compile("|".join(re.escape(normalize_text(w))
                                                                     for w in spec["exclude"]))
    if cat.analyte_by_name:
        cat.analyte_name_regex = words_regex(cat.analyte_by_name)
    cat.osteoporotic_fracture_codes = CodeSet.of(     # (site codes, with an age from which they count, are not)
        "osteoporotic_fracture", [c for c in cat.index_codes("fragility_fracture_history")
                                  if "min_age_at_onset" not in c] + [
            c for c in det["index_conditions"]["osteoporosis"] if c.get("match") == "prefix" and c["code"].startswith("M80")],
        normalize_system)
    fr = det.get("fractures", {})
    for site, spec in fr.get("sites", {}).items():
        cat.fracture_sites[site] = CodeSet.of(site, spec.get("codes", []), normalize_system)
        for w in spec.get("condition_text", []):
            cat.fracture_text_sites[normalize_text(w)] = site
        for w in spec.get("procedure_text", []):
            cat.fracture_procedure_sites[normalize_text(w)] = site
    for w in fr.get("osteoporotic_words", []):
        cat.fracture_text_sites.setdefault(normalize_text(w), "unspecified")
    if cat.fracture_text_sites:
        cat.fracture_text_regex = words_regex(cat.fracture_text_sites)
    if cat.fracture_procedure_sites:
        cat.fracture_procedure_regex = words_regex(cat.fracture_procedure_sites)

    words = cat.medication_settings["non_systemic"]["words"]
    # words match at the start of a word: "cutaneous" must not match "subcutaneously"
    cat.non_systemic_regex = re.compile(r"(?<![a-z])(?:" + "|".join(re.escape(w.lower()) for w in words) + ")")
    for cause in cat.causes.values():
        for term in cause.detect.get("condition_text", []):
            cat.condition_text_causes.setdefault(normalize_text(term), []).append(cause.id)
    if cat.condition_text_causes:
        cat.condition_text_regex = words_regex(cat.condition_text_causes)
        cues = cat.detection.get("condition_text") or {}
        cat.cues_before_regex = words_regex(w for group in cues.get("cues_before", {}).values() for w in group)
        cat.cues_after_regex = words_regex(w for group in cues.get("cues_after", {}).values() for w in group)
    words = cat.medication_settings.get("single_dose", {}).get("words", [])
    cat.single_dose_regex = re.compile(r"(?<![a-z])(?:" + "|".join(re.escape(w.lower()) for w in words) + ")") \
        if words else None
    for f in cat.medication_settings.get("frequency_words", []):
        cat.frequency_patterns.append((re.compile(f["pattern"], re.I), float(f["per_day"])))

    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined, trim_blocks=False)
    try:
        cat.templates["detail"] = env.from_string(cat.card["detail"])
        cat.templates["detail"].render(**_sample_detail_context())   # every variable defined, or refuse now
    except jinja2.TemplateError as exc:
        _template_problem("card.yaml", ("detail",), "detail", exc)
    _check_format_templates(cat.card)


# the conditions therapy.yaml rules may name (cds_service/clinical/safety.py and advice.py decide them)
SAFETY_WHEN = {"pregnant", "lactating", "reproductive_potential", "egfr_below", "calcium_low", "alp_low",
               "oesophageal_disorder", "gastric_surgery", "recent_cardiovascular_event"}
ADVICE_WHEN = {"pregnancy_or_lactation", "pregnant_or_lactating", "kidney_g4_g5", "young_adult", "very_high_risk",
               "always", "phpt_surgical_criteria"}


def _check_therapy(cat: Catalog) -> None:
    """therapy.yaml: every drug a class names is an osteoporosis treatment, every class, citation and rule kind exists."""
    th = cat.therapy
    drugs = {ing["name"] for ing in cat.detection["osteoporosis_treatment"]["ingredients"]}
    classes = {c["id"] for c in th["therapy"]["classes"]}
    cites = list(th["therapy"].get("citations", [])) + list(th["therapy"].get("failure_citations", []))
    for c in th["therapy"]["classes"]:
        where = f"therapy.yaml therapy.classes {c['id']}"
        for d in c["drugs"]:
            _require(d in drugs, where, f"{d!r} is not an osteoporosis_treatment ingredient in detection.yaml")
            _require(d not in cat.treatment_classes or cat.treatment_classes[d]["id"] == c["id"], where,
                     f"{d!r} is in two classes")
            cat.treatment_classes[d] = c
        cites += c.get("citations", [])
    for r in th["safety"]["rules"]:
        where = f"therapy.yaml safety.rules {r['id']}"
        _require(r["when"] in SAFETY_WHEN, where, f"when must be one of {sorted(SAFETY_WHEN)}")
        for c in r["classes"]:
            _require(c in classes, where, f"unknown class {c}")
        for d in list(r.get("drugs", [])) + list(r.get("limits", {})):
            _require(d in drugs, where, f"unknown drug {d!r}")
        cites += r.get("citations", [])
    for r in th["advice"]["lines"] + th["advice"].get("also", []):
        where = f"therapy.yaml advice {r['id']}"
        _require(r["when"] in ADVICE_WHEN, where, f"when must be one of {sorted(ADVICE_WHEN)}")
        _require(bool(r.get("text") or (r.get("text_female") and r.get("text_male"))), where,
                 "needs text (or text_female and text_male)")
        cites += r.get("citations", [])
    cites += th["safety"].get("citations", []) + [th["advice"]["risk"]["citation"]]
    for c in cites:
        _require(c in cat.citations, "therapy.yaml", f"unknown citation {c}")


def _check_orders(cat: Catalog) -> None:
    """orders.yaml: every cause, citation, workup item and code it names exists (or is verified)."""
    o = cat.orders
    workup_ids = {w["id"] for tier in cat.detection["workup"].values() for w in tier}
    for t in o["triggers"]:
        where = f"orders.yaml triggers {t['id']}"
        _require(t["cause"] in cat.causes, where, f"unknown cause {t['cause']}")
        _require(t["dxa_workup"] in workup_ids, where, f"unknown workup item {t['dxa_workup']}")
        for c in t["citations"]:
            _require(c in cat.citations, where, f"unknown citation {c}")
    risk, guards = o["glucocorticoid_risk"], o["bisphosphonate_guards"]
    for c in [risk["citation"]] + guards["citations"] + [d["citation"] for d in o["drafts"].values()]:
        _require(c in cat.citations, "orders.yaml", f"unknown citation {c}")
    for name, d in o["drafts"].items():
        if "code" in d:
            _check_code(d["code"], f"orders.yaml drafts.{name}")
            _require(d["code"]["verified"], f"orders.yaml drafts.{name}", "a drug ordered must carry a verified code "
                     "(or none: it is then offered as text)")
    try:
        cat.templates["order_detail"] = jinja2.Environment(
            autoescape=False, undefined=jinja2.StrictUndefined).from_string(o["card"]["detail"])
        from types import SimpleNamespace as NS
        cat.templates["order_detail"].render(orders=["x"], why="x", exposure=["x"], risk=NS(label="x", reasons=["x"]),
                                             guards=["x"], kidney=NS(latest="x", caution="x"), context=["x"])
    except jinja2.TemplateError as exc:
        _template_problem("orders.yaml", ("card", "detail"), "card.detail", exc)


def _sample_detail_context() -> dict:
    """A complete sample of what CardRenderer passes the detail template (every branch taken)."""
    from types import SimpleNamespace as NS
    cause = NS(label="x", tier="x", strength="strong", evidence=["x"], next_step="x", sources="x", risk="x")
    return {"alerts": [NS(heading="x", detail="x", sources="x")], "conflicts": [NS(text="x", sources="x")],
            "gap": NS(bone="x", evidence=["x"], options="x", guidelines="x", risk="x", risk_source="x", also=["x"]),
            "kidney": NS(latest="x", caution="x", evidence=["x"]), "screening": "x",
            "causes": [cause], "listed": [NS(label="x", evidence=["x"])],
            "context": NS(bone_status="x", dxa="x", treatment="x", workup="x", results="x")}


# the fields each str.format template in card.yaml may use
_FORMAT_FIELDS = {
    ("summary", "template"): {"causes"}, ("summary", "template_short"): {"causes"}, ("summary", "more"): {"n"},
    ("summary", "gap_template"): {"bone", "causes"}, ("summary", "gap_template_short"): {"bone"},
    ("summary", "gap_refer_template"): {"bone", "causes"}, ("summary", "gap_refer_template_short"): {"bone"},
    ("summary", "screening"): {"age", "causes"}, ("summary", "screening_short"): {"age"},
    ("summary", "normal_bmd"): {"site", "t_score"},
    ("screening", "text"): {"causes", "sex", "age", "from_age", "guidelines"},
    ("summary", "treated_new"): {"drug", "since", "causes"}, ("summary", "treated_decision"): {"drug", "since", "decision"},
    ("summary", "treated_known"): {"drug", "since", "causes"},
    ("context", "bone_diagnosis"): {"items"}, ("context", "dxa_recent"): {"date", "days"},
    ("context", "dxa_none"): {"days"}, ("context", "treatment_current"): {"items"},
    ("context", "treatment_since"): {"drug", "since"}, ("context", "next_decision"): {"text"},
    ("context", "latest_t_score"): {"value", "site", "date"}, ("context", "frax_recent"): {"value", "date"},
    ("context", "latest_z_score"): {"value", "site", "date"}, ("context", "treatment_past"): {"items"},
    ("context", "frax_none"): {"days"}, ("context", "latest_results"): {"items"},
    ("context", "no_results"): {"days"}, ("context", "workup_done"): {"days", "items"},
    ("context", "workup_none_done"): {"days"}, ("kidney", "latest"): {"value", "date"},
    ("kidney", "caution"): {"guidelines"}, ("suggestions", "baseline_label"): {"n"},
    ("suggestions", "baseline_action"): {"label"}, ("suggestions", "directed_label"): {"label"},
}


def _check_format_templates(card: dict) -> None:
    """A `{placeholder}` the renderer does not supply would fail on the first card: refuse it at load."""
    formatter = string.Formatter()
    for (section, key), allowed in _FORMAT_FIELDS.items():
        text = (card.get(section) or {}).get(key)
        if not isinstance(text, str):
            continue
        try:
            used = {name.split(".")[0].split("[")[0] for _, name, _, _ in formatter.parse(text) if name is not None}
        except ValueError as exc:
            _require(False, f"card.yaml {section}.{key}", f"bad template: {exc}")
            continue
        unknown = used - allowed
        _require(not unknown, f"card.yaml {section}.{key}",
                 f"unknown placeholder(s) {sorted(unknown)}; this template may use {sorted(allowed)}")


def _has_word(name: str, text: str) -> bool:
    return re.search(r"(?<![a-z0-9])" + re.escape(name.lower()) + r"(?![a-z0-9])", text) is not None


def _ingredient_for_product(med: dict, cause_id: str, display: str) -> Ingredient | None:
    """A value-set product code stands for the ingredient its display names; None for a product of an
    excluded ingredient (fludrocortisone, a mineralocorticoid, sits in VSAC's oral glucocorticoid set)."""
    text = display.lower()
    if any(_has_word(ing["name"], text) for ing in med.get("excluded_ingredients", [])):
        return None
    # the whole ingredient name, longest first: 'methylprednisolone' is not 'prednisolone', nor
    # 'fludrocortisone' 'cortisone'
    for ing in sorted(med["ingredients"], key=lambda i: -len(i["name"])):
        if _has_word(ing["name"], text):
            return Ingredient(cause_id, ing["name"], ing.get("prednisone_equivalent_factor"),
                              bool(ing.get("counts_only_with_other_ingredients")))
    first = med["ingredients"][0]
    return Ingredient(cause_id, first["name"] if len(med["ingredients"]) == 1 else display or cause_id,
                      first.get("prednisone_equivalent_factor") if len(med["ingredients"]) == 1 else None)
