"""The catalog's cross-references: citations and value sets named everywhere, code systems from a closed list,
therapy and order rules, card templates that render; every problem with its file and line."""
from __future__ import annotations

import contextvars

import re
import string
from pathlib import Path
from typing import Any

import jinja2

from .model import Catalog, CatalogError, ICD10CM, KNOWN_SYSTEMS, SYSTEM_ALIASES



STRENGTHS = ("strong", "moderate", "weak")


# where a code beyond the reference comes from: a Synthea module (cards/sources/synthea-codes.tsv)
# or a published VSAC expansion stored in value_sets.yaml
# or the ICD-10-CM tabular list itself (icd10cm:YEAR: the CMS April release, checked by the catalog test)
CODE_SOURCES = ("synthea:", "vsac:", "icd10cm:")


MED_RULES = {"glucocorticoid_exposure", "sustained_use", "any_use", "current_use_with_lab", "high_dose", "recent_use"}


LOINC_KEYS = ("loinc", "calcium_loinc", "albumin_loinc", "pth_loinc", "weight_loinc", "height_loinc",
              "creatinine_loinc")


OBS_KINDS = {"threshold", "pth_calcium", "persistent", "bmi", "smoking", "dexamethasone_suppression"}


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


_problems: contextvars.ContextVar[_Problems | None] = contextvars.ContextVar("catalog_problems", default=None)
