"""The indexes the hot path reads: code -> causes (exact and ICD-10-CM prefixes), drug ingredients by code and
by name, code sections."""
from __future__ import annotations

import re

import jinja2

from .codesets import SECTIONS, CodeSet, icd_key
from .checks import _check_format_templates, _sample_detail_context, _template_problem, LOINC_KEYS
from .model import ATC, Catalog, ICD10CM, Ingredient, LOINC, normalize_system, normalize_text, RXNORM, words_regex


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
