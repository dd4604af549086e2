"""Loading cards/: YAML with line numbers, the schema (catalog_schema.yaml), the cross-reference checks, then the
Catalog with its indexes; a validated catalog is cached per folder state."""
from __future__ import annotations

import pickle
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .codesets import SECTIONS
from .checks import _check_code, _check_everywhere, _check_orders, _check_therapy, _problems, _Problems, _require, LOINC_KEYS, MED_RULES, OBS_KINDS, STRENGTHS
from .indexes import _build_indexes
from .model import Catalog, CatalogError, Cause


# libyaml's C loader when present (several times faster start-up); same safe semantics
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _default_cards_dir() -> Path:
    """cards/ beside the package in a source checkout; the package data an installed wheel carries."""
    checkout = Path(__file__).resolve().parents[2] / "cards"
    if (checkout / "catalog.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parents[1] / "content"


DEFAULT_CARDS_DIR = _default_cards_dir()


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


def validated_files(cards_dir: str | Path | None = None) -> bytes | None:
    """The parsed and checked files of a folder this process has loaded, for another process to build its Catalog
    from (`reuse_validated_files`) without parsing and checking them again: a screen's workers skip a second or two
    each. None if the folder has not been loaded here, or has changed since."""
    stamp = _files_stamp(Path(cards_dir) if cards_dir else DEFAULT_CARDS_DIR)
    blob = _VALIDATED.get(stamp) if stamp else None
    return pickle.dumps((stamp, blob)) if blob is not None else None


def reuse_validated_files(state: bytes) -> None:
    """Take another process's `validated_files`: `load_catalog` on the same folder then builds from them. They are
    keyed by the files' path, size and modification time, so a folder changed in between is read afresh."""
    stamp, blob = pickle.loads(state)
    _VALIDATED.clear()
    _VALIDATED[stamp] = blob


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
