"""The clinical catalog: complete, traceable to the reference, and refused when malformed."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import simple_icd_10_cm as icd10cm
import yaml

from cds_service.knowledge.catalog import CatalogError, load_catalog

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "cause-catalog-reference.yaml"

STABLE_IDS = """glucocorticoids heparin hyperthyroidism thyroid_hormone_excess hyperparathyroidism cushings
diabetes_type1 diabetes_type2 hypogonadism premature_menopause celiac ibd gastrectomy_bariatric malabsorption
rheumatoid_arthritis ankylosing_spondylitis sle multiple_myeloma mgus leukemia_lymphoma ckd chronic_liver_disease
eating_disorder low_body_weight anticonvulsants aromatase_inhibitors androgen_deprivation ppi dmpa
thiazolidinediones calcineurin_inhibitors alcohol smoking immobility copd hiv organ_transplant
vitamin_d_deficiency""".split()


def test_catalog_covers_every_reference_cause_with_stable_ids(catalog):
    assert set(STABLE_IDS) <= set(catalog.causes)
    assert len(catalog.causes) >= 65
    for cause in catalog.causes.values():
        assert cause.strength in ("strong", "moderate", "weak")
        assert cause.citations and all(c in catalog.citations for c in cause.citations)


def test_firing_policy_matches_the_issue(catalog):
    for cid in STABLE_IDS:
        assert catalog.causes[cid].fires_alone is (cid != "diabetes_type2"), cid
    for weak in ("ssri", "loop_diuretics", "lithium", "warfarin", "parkinsons", "multiple_sclerosis", "stroke"):
        assert catalog.causes[weak].fires_alone is False
        assert catalog.causes[weak].policy_reason


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():          # a prerequisite (README), never skipped silently
        pytest.fail(f"{REFERENCE} is missing: check out the shared reference material beside this folder as ../shared")
    return yaml.safe_load(REFERENCE.read_text())


def _reference_codes(ref) -> dict[tuple[str, str], set[bool]]:
    out: dict[tuple[str, str], set[bool]] = {}

    def walk(node, in_value_set=False):
        if isinstance(node, dict):
            if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
                verified = True if in_value_set and "verified" not in node else bool(node.get("verified"))
                out.setdefault((node["system"], node["code"]), set()).add(verified)
            for k, v in node.items():
                walk(v, in_value_set or k == "value_sets")
        elif isinstance(node, list):
            for v in node:
                walk(v, in_value_set)
    walk(ref)
    return out


def _catalog_codes(cards: Path):
    """Every (system, code, verified, where, source) the catalog carries."""
    causes = yaml.safe_load((cards / "causes.yaml").read_text())["causes"]
    detection = yaml.safe_load((cards / "detection.yaml").read_text())
    rx = "http://www.nlm.nih.gov/research/umls/rxnorm"
    atc = "http://www.whocc.no/atc"
    found = []

    def add(e, where):
        found.append((e["system"], e["code"], e["verified"], where, e.get("source", "reference")))

    def ingredients(items, where):
        for ing in items:
            if ing.get("rxnorm", {}).get("code"):
                add({"system": rx, **ing["rxnorm"]}, where)
            if ing.get("atc", {}).get("code"):
                add({"system": atc, **ing["atc"]}, where)

    for c in causes:
        d = c["detect"]
        for e in d.get("codes", []):
            add(e, c["id"])
        med = d.get("medications") or {}
        ingredients(med.get("ingredients", []) + med.get("excluded_ingredients", []), c["id"])
        for e in med.get("products", []):
            add(e, c["id"])
    for key, group in detection["existing_dxa"].items():
        for e in group:
            add(e, f"existing_dxa.{key}")
    ingredients(detection["osteoporosis_treatment"]["ingredients"], "osteoporosis_treatment")
    for e in detection["osteoporosis_treatment"]["other_codes"]:
        add(e, "osteoporosis_treatment")
    for key, group in detection["index_conditions"].items():
        for e in group:
            add(e, f"index_conditions.{key}")
    from cds_service.knowledge.codesets import SECTIONS
    for key in SECTIONS:
        for e in detection.get(key, {}).get("codes", []):
            add(e, key)
    for site, spec in detection["fractures"]["sites"].items():
        for e in spec.get("codes", []):
            add(e, f"fractures.{site}")
    for tier, items in detection["workup"].items():
        for w in items:
            for e in w["codes"]:
                add(e, w["id"])
    observations = yaml.safe_load((cards / "observations.yaml").read_text())
    for group, entries in observations.get("loinc_groups", {}).items():
        for e in entries:
            add({"system": "http://loinc.org", "verified": True, **e}, f"loinc_groups.{group}")
    orders = yaml.safe_load((cards / "orders.yaml").read_text())
    for name, draft in orders["drafts"].items():          # drugs the prescribing card drafts
        if "code" in draft:
            add(draft["code"], f"orders.drafts.{name}")
    return found


def _catalog_displays(cards: Path) -> dict[tuple[str, str], str]:
    """(system, code) -> the display the catalog gives it, wherever it is listed."""
    out = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
                out.setdefault((node["system"], node["code"]), node.get("display", ""))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for f in ("causes.yaml", "detection.yaml", "orders.yaml"):
        walk(yaml.safe_load((cards / f).read_text()))
    return out


def _synthea_codes(cards: Path) -> dict[tuple[str, str], tuple[str, set[str]]]:
    """(system, code) -> (display, modules) from the committed Synthea module snapshot."""
    names = {"SNOMED-CT": "http://snomed.info/sct", "LOINC": "http://loinc.org",
             "RxNorm": "http://www.nlm.nih.gov/research/umls/rxnorm"}
    out = {}
    for line in (cards / "sources" / "synthea-codes.tsv").read_text(encoding="utf-8").splitlines()[3:]:
        system, code, display, modules = line.split("\t")
        if system in names:
            prev = out.get((names[system], code), ("", set()))
            out[(names[system], code)] = (prev[0] or display, prev[1] | set(modules.split(";")))
    return out


def test_every_catalog_code_records_a_source_that_holds_it(reference):
    """A code is in shared/reference with the same verified flag, or (source synthea:MODULE) emitted by
    that Synthea module, or (source vsac:OID|VERSION) in that published expansion in value_sets.yaml."""
    ref = _reference_codes(reference)
    synthea = _synthea_codes(ROOT / "cards")
    value_sets = {v["oid"]: v for v in yaml.safe_load((ROOT / "cards" / "value_sets.yaml").read_text())["value_sets"]}
    codes = _catalog_codes(ROOT / "cards")
    assert len(codes) > 400
    displays = _catalog_displays(ROOT / "cards")
    problems = []
    for system, code, verified, where, source in codes:
        if source == "reference":
            flags = ref.get((system, code))
            if flags is None:
                problems.append(f"{where}: {system}|{code} is not in the reference")
            elif verified not in flags:
                problems.append(f"{where}: {system}|{code} verified={verified}, reference says {sorted(flags)}")
        elif source.startswith("synthea:"):
            hit = synthea.get((system, code))
            if hit is None or source[len("synthea:"):] not in hit[1]:
                problems.append(f"{where}: {system}|{code} is not emitted by Synthea module {source}")
        elif source.startswith("vsac:"):
            oid, _, version = source[len("vsac:"):].partition("|")
            vs = value_sets.get(oid)
            if vs is None or vs.get("version") != version or (system, code) not in {(c["system"], c["code"]) for c in vs["codes"]}:
                problems.append(f"{where}: {system}|{code} is not in stored expansion {source}")
        elif source.startswith("icd10cm:"):
            # the ICD-10-CM tabular list itself (CMS, April 2026, as packaged by simple-icd-10-cm): the code exists
            # and the catalog's display is its official title
            if system != "http://hl7.org/fhir/sid/icd-10-cm" or not icd10cm.is_valid_item(code):
                problems.append(f"{where}: {system}|{code} is not an ICD-10-CM code or category")
            elif displays[(system, code)].lower() != icd10cm.get_description(code).lower():
                problems.append(f"{where}: {code} is '{icd10cm.get_description(code)}', "
                                f"not '{displays[(system, code)]}'")
        else:
            problems.append(f"{where}: {system}|{code} has an unknown source {source}")
    assert not problems, "\n".join(problems[:20])


def test_unverified_codes_stay_marked(catalog, reference):
    unverified = {("http://www.nlm.nih.gov/research/umls/rxnorm", c) for c in
                  ("72965", "258494", "1307298", "1999574", "2180325", "1100072", "69528", "10814", "993449")}
    codes = {(s, c): v for s, c, v, _, _ in _catalog_codes(ROOT / "cards")}
    for key in unverified:
        if key in codes:
            assert codes[key] is False, key


def test_value_set_expansions_match_the_reference_or_name_their_published_source(reference):
    """An expansion is the reference's, or one imported by tools/import_value_sets.py with its VSAC
    version, repository, commit and path recorded (and as many codes as it says it stores)."""
    ref_vs = {v["oid"]: v for v in reference["value_sets"]}
    ours = yaml.safe_load((ROOT / "cards" / "value_sets.yaml").read_text())["value_sets"]
    imported = 0
    for vs in ours:
        if "source" in vs:
            imported += 1
            assert vs["version"] and set(vs["source"]) == {"repository", "commit", "path"}, vs["oid"]
            assert len(vs["source"]["commit"]) == 40 and vs["oid"] in vs["source"]["path"], vs["oid"]
            assert vs["stored_codes"] == len(vs["codes"]) > 0, vs["oid"]
            continue
        ref_codes = ref_vs[vs["oid"]].get("codes")
        ref_set = {(c["system"], c["code"]) for c in ref_codes} if isinstance(ref_codes, list) else set()
        assert {(c["system"], c["code"]) for c in vs["codes"]} == ref_set, vs["oid"]
    assert imported >= 10


def test_orders_use_verified_codes_only(catalog):
    for tier in catalog.detection["workup"].values():
        for item in tier:
            codes = {c["code"]: c for c in item["codes"]}
            for code in item["order"]:
                assert codes[code]["verified"], (item["id"], code)


# ---- the loader refuses malformed catalogs ---------------------------------------------------
def _broken_copy(tmp_path: Path, edit) -> Path:
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    data = yaml.safe_load((cards / "causes.yaml").read_text())
    edit(data["causes"])
    (cards / "causes.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return cards


def _cause(causes, cid):
    return next(c for c in causes if c["id"] == cid)


@pytest.mark.parametrize("edit, message", [
    (lambda cs: _cause(cs, "ckd").update(citations=[]), r"cards/causes.yaml:\d+: causes\[ckd\].citations: \[\] should be non-empty"),
    (lambda cs: _cause(cs, "sle").update(strength="very strong"), r"causes\[sle\].strength: 'very strong' is not one of"),
    (lambda cs: _cause(cs, "sle")["detect"]["codes"][0].update(system="http://example.org/made-up"), "unknown code system"),
    (lambda cs: _cause(cs, "sle")["detect"]["codes"][0].pop("verified"), "'verified' is a required property"),
    (lambda cs: _cause(cs, "hiv")["detect"]["codes"][-1].update(match="prefix"), "prefix match is only for ICD-10-CM"),
    (lambda cs: _cause(cs, "celiac").update(workup=["wk_unknown"]), "unknown workup item"),
    (lambda cs: _cause(cs, "ppi")["detect"]["medications"].update(rule="sometimes"), "rule: 'sometimes' is not one of"),
    (lambda cs: _cause(cs, "ssri")["policy"].pop("reason"), "never fires alone needs a reason"),
    (lambda cs: cs.append(dict(_cause(cs, "copd"))), "duplicate id"),
    (lambda cs: _cause(cs, "copd").update(citations=["nobody2099"]), "unknown citation nobody2099"),
    (lambda cs: _cause(cs, "ckd")["detect"]["evidence_age"].update(procedures_within_days="90"),
     "procedures_within_days: '90' is not of type 'integer'"),
    (lambda cs: _cause(cs, "ckd")["detect"]["evidence_age"].pop("reason"), "'reason' is a required property"),
    (lambda cs: _cause(cs, "copd")["detect"].update(condition_text="copd"), "condition_text: 'copd' is not of type 'array'"),
    # the typos a reviewer makes: a misspelled key is refused, never silently ignored
    (lambda cs: _cause(cs, "heparin")["detect"]["medications"].update(min_dayz=90),
     r"causes\[heparin\].detect.medications: Additional properties are not allowed \('min_dayz' was unexpected\)"),
    (lambda cs: _cause(cs, "glucocorticoids")["thresholds"][0].update(sourc="acr2022"), "'sourc' was unexpected"),
])
def test_loader_fails_loudly_on_a_malformed_entry(tmp_path, edit, message):
    cards = _broken_copy(tmp_path, edit)
    with pytest.raises(CatalogError, match=message):
        load_catalog(cards)


def _edit_text(tmp_path: Path, file: str, old: str, new: str) -> Path:
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    text = (cards / file).read_text()
    assert old in text
    (cards / file).write_text(text.replace(old, new, 1))
    return cards


def test_a_duplicated_key_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys: `strength: weak` added under glucocorticoids would turn
    its warnings into info without anyone noticing."""
    cards = _edit_text(tmp_path, "causes.yaml", "  strength: strong\n", "  strength: strong\n  strength: weak\n")
    with pytest.raises(CatalogError) as err:
        load_catalog(cards)
    (problem,) = err.value.problems
    assert re.fullmatch(r"cards/causes.yaml:(\d+): duplicate key 'strength' \(first at line (\d+)\): .*", problem)


def test_every_problem_is_reported_at_once_on_its_line(tmp_path):
    def edit(cs):
        _cause(cs, "heparin")["detect"]["medications"].update(min_dayz=90)
        _cause(cs, "ppi")["detect"]["medications"].update(lookback_days="a year")
        _cause(cs, "copd").update(citations=["nobody2099"])
    cards = _broken_copy(tmp_path, edit)
    with pytest.raises(CatalogError) as err:
        load_catalog(cards)
    problems = err.value.problems
    assert len(problems) == 2                 # the schema's two; cross-references are checked once it passes
    assert all(re.match(r"cards/causes.yaml:\d+: ", p) for p in problems)
    lines = (cards / "causes.yaml").read_text().splitlines()
    for p in problems:
        n = int(p.split(":")[1])
        assert "min_dayz" in lines[n - 1] or "lookback_days" in lines[n - 1]


@pytest.mark.parametrize("file, old, new, message", [
    ("card.yaml", "{{ context.workup }}", "{{ context.wrokup }}", r"card.yaml:\d+: detail: template: .*wrokup"),
    ("card.yaml", 'dxa_none: "No DXA in the last {days} days', 'dxa_none: "No DXA in the last {dayz} days',
     r"context.dxa_none: unknown placeholder\(s\) \['dayz'\]"),
    ("observations.yaml", "    below: 0.1\n", "    below: low\n", r"rules\[tsh_suppressed\].below: 'low' is not of type 'number'"),
    ("value_sets.yaml", "- system: http://hl7.org/fhir/sid/icd-10-cm\n    code: E05.00",
     "- system: http://hl7.org/fhir/sid/icd-10-cm\n    cod: E05.00", "code entries are not"),
])
def test_templates_numbers_and_other_files_are_checked_at_load(tmp_path, file, old, new, message):
    cards = _edit_text(tmp_path, file, old, new)
    with pytest.raises(CatalogError, match=message):
        load_catalog(cards)


def test_loader_refuses_an_unverified_order_code(tmp_path):
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    det = yaml.safe_load((cards / "detection.yaml").read_text())
    item = next(w for w in det["workup"]["cause_directed"] if w["id"] == "wk_cushing")
    item["order"].append("2142-8")            # salivary cortisol: verified false in the reference
    (cards / "detection.yaml").write_text(yaml.safe_dump(det, sort_keys=False))
    with pytest.raises(CatalogError, match="not verified"):
        load_catalog(cards)


@pytest.mark.parametrize("file, old, new, message", [
    ("detection.yaml", "  - system: http://loinc.org\n", "  - system: http://loinc.og\n",
     r"cards/detection.yaml:4: unknown code system 'http://loinc.og' \(did you mean 'http://loinc.org'\?\)"),
    ("value_sets.yaml", "system: http://hl7.org/fhir/sid/icd-10-cm\n", "system: http://hl7.org/fhir/sid/icd10-cm\n",
     r"cards/value_sets.yaml:\d+: unknown code system 'http://hl7.org/fhir/sid/icd10-cm' \(did you mean "
     r"'http://hl7.org/fhir/sid/icd-10-cm'\?\)"),
    ("causes.yaml", "  - source: frax\n", "  - source: fraxx\n",
     r"cards/causes.yaml:\d+: source: unknown citation id 'fraxx'"),
    ("card.yaml", "  - {{ a.detail }}\n", "  - {{ a.detail }\n", r"cards/card.yaml:107: detail: template: unexpected '}'"),
])
def test_a_typo_anywhere_is_named_on_its_line(tmp_path, file, old, new, message):
    """A misspelled code-system URI or citation id in any file (not only where a cause's codes are checked) and a
    template error, each on the line of the file where it is."""
    cards = _edit_text(tmp_path, file, old, new)
    with pytest.raises(CatalogError) as err:
        load_catalog(cards)
    assert any(re.fullmatch(message, p) for p in err.value.problems), err.value.problems


# ---- another process builds from the files this one checked (a screen's workers) -------------------------
def test_checked_files_handed_to_another_process_build_the_same_catalog_and_a_changed_folder_is_read_again(
        tmp_path, monkeypatch):
    """A screen's workers take the main process's parsed and checked cards/ instead of parsing them again. The
    catalog they build is the same; a file changed since is read and checked afresh, never taken from the hand-off."""
    from cds_service.knowledge import loading
    from cds_service.knowledge.catalog import reuse_validated_files, validated_files

    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    first = load_catalog(cards)
    state = validated_files(cards)
    assert state is not None and validated_files(tmp_path / "elsewhere") is None
    loading._VALIDATED.clear()                              # as in a fresh worker process
    reuse_validated_files(state)
    parsed = []
    monkeypatch.setattr(loading, "_read_and_check", lambda *a: parsed.append(a) or pytest.fail("parsed again"))
    again = load_catalog(cards)
    assert not parsed and again.version == first.version
    assert list(again.causes) == list(first.causes) and again.causes["ckd"] == first.causes["ckd"]
    monkeypatch.undo()
    text = (cards / "causes.yaml").read_text()
    loading._VALIDATED.clear()
    reuse_validated_files(state)                            # the hand-off predates the edit
    (cards / "causes.yaml").write_text(text.replace("strength: strong", "strength: very strong", 1))
    with pytest.raises(CatalogError, match="very strong"):
        load_catalog(cards)
