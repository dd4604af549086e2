"""One-time import of ../shared/reference/cause-catalog-reference.yaml into a catalog folder.

The reference is the verified code source; cards/ is the reviewed, versioned catalog the
service runs.  This script writes causes.yaml, value_sets.yaml, detection.yaml and citations.yaml
from the reference plus the rule choices below (stable ids, firing policy, exposure rules, code
roles).  After the first import clinicians edited cards/ directly, so a rerun would throw their
work away: it writes to build/import/ by default, to compare with cards/ (`diff -r build/import
cards`), and into cards/ only with --out cards --force.

    .venv/bin/python tools/import_reference.py [REFERENCE.yaml] [--out DIR] [--force]
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared/reference/cause-catalog-reference.yaml"
OUT = ROOT / "build" / "import"
OUTPUTS = ("causes.yaml", "value_sets.yaml", "detection.yaml", "citations.yaml")

# reference id -> stable cause id (issue #3: these ids are used as-is downstream)
STABLE_IDS = {
    "med_glucocorticoids": "glucocorticoids", "med_heparin": "heparin",
    "cond_hyperthyroidism": "hyperthyroidism", "med_thyroid_hormone_excess": "thyroid_hormone_excess",
    "cond_primary_hyperparathyroidism": "hyperparathyroidism", "cond_cushing": "cushings",
    "cond_type1_diabetes": "diabetes_type1", "cond_type2_diabetes": "diabetes_type2",
    "cond_male_hypogonadism": "hypogonadism", "cond_premature_menopause_poi": "premature_menopause",
    "cond_celiac": "celiac", "cond_ibd": "ibd", "cond_gastrectomy_bariatric": "gastrectomy_bariatric",
    "cond_malabsorption": "malabsorption", "cond_rheumatoid_arthritis": "rheumatoid_arthritis",
    "cond_ankylosing_spondylitis": "ankylosing_spondylitis", "cond_sle": "sle",
    "cond_multiple_myeloma": "multiple_myeloma", "cond_mgus": "mgus",
    "cond_leukemia_lymphoma": "leukemia_lymphoma", "cond_ckd": "ckd",
    "cond_chronic_liver_disease": "chronic_liver_disease", "cond_eating_disorder": "eating_disorder",
    "cond_chronic_malnutrition_low_bmi": "low_body_weight", "med_anticonvulsants": "anticonvulsants",
    "med_aromatase_inhibitors": "aromatase_inhibitors", "med_androgen_deprivation": "androgen_deprivation",
    "med_ppi": "ppi", "med_dmpa": "dmpa", "med_thiazolidinediones": "thiazolidinediones",
    "med_calcineurin_inhibitors": "calcineurin_inhibitors", "life_alcohol": "alcohol",
    "life_smoking": "smoking", "cond_immobilization": "immobility", "cond_copd": "copd",
    "cond_hiv": "hiv", "cond_organ_transplant": "organ_transplant",
    "cond_vitamin_d_deficiency": "vitamin_d_deficiency",
}
OTHER_IDS = {
    "med_methotrexate_high_dose": "methotrexate_high_dose", "med_ssri": "ssri",
    "med_loop_diuretics": "loop_diuretics", "med_sglt2_canagliflozin": "canagliflozin",
    "med_tenofovir_disoproxil": "tenofovir_disoproxil", "med_lithium": "lithium",
    "med_warfarin": "warfarin", "med_tamoxifen_premenopausal": "tamoxifen_premenopausal",
    "med_chemotherapy_ovarian_suppression": "chemotherapy_ovarian_suppression",
    "cond_amenorrhea": "amenorrhea", "cond_hyperprolactinemia": "hyperprolactinemia",
    "cond_hypopituitarism": "hypopituitarism", "cond_cystic_fibrosis": "cystic_fibrosis",
    "cond_psoriatic_arthritis": "psoriatic_arthritis", "cond_systemic_mastocytosis": "systemic_mastocytosis",
    "cond_idiopathic_hypercalciuria": "hypercalciuria", "cond_parkinson": "parkinsons",
    "cond_multiple_sclerosis": "multiple_sclerosis", "cond_stroke": "stroke",
    "cond_spinal_cord_injury": "spinal_cord_injury", "cond_osteogenesis_imperfecta": "osteogenesis_imperfecta",
    "cond_turner": "turner_syndrome", "cond_klinefelter": "klinefelter_syndrome",
    "cond_hypophosphatasia": "hypophosphatasia", "cond_ehlers_danlos": "ehlers_danlos",
    "cond_marfan": "marfan", "cond_pregnancy_lactation": "pregnancy_lactation",
}

# Causes beyond the stable list that are only ever listed on a card that fires for another
# reason (issue #3 firing policy), with the reason a reviewer sees.
LISTED_ONLY = {
    "methotrexate_high_dose": "Weak evidence; oncologic high-dose use only.",
    "ssri": "Weak-to-moderate observational association; contributes to fall risk review.",
    "loop_diuretics": "Weak; not in the BHOF/NOF medication table.",
    "canagliflozin": "Weak; labelled fracture signal only.",
    "tenofovir_disoproxil": "Modest BMD effect; relevant alongside HIV or other risks.",
    "lithium": "Weak/uncertain evidence.",
    "warfarin": "Weak/uncertain evidence; not in the BHOF/NOF table.",
    "tamoxifen_premenopausal": "Menopausal status is inferred from age only; list, do not fire.",
    "hyperprolactinemia": "Acts through hypogonadism; list beside the main cause.",
    "hypopituitarism": "Acts through hypogonadism/GH deficiency; list beside the main cause.",
    "hypercalciuria": "Usually found during a workup; list beside the main cause.",
    "parkinsons": "Neurological condition without documented immobility.",
    "multiple_sclerosis": "Neurological condition without documented immobility.",
    "stroke": "Neurological condition without documented immobility.",
    "pregnancy_lactation": "Rare; only with a fracture in pregnancy or post partum.",
}
ALWAYS_WITH_OTHERS = {"diabetes_type2": "FRAX underestimates risk in type 2 diabetes, but it is not a reason to alert on its own."}

# Codes that add context but must not fire a cause on their own (reference notes say why).
SUPPORTING = {
    ("med_anticonvulsants", "G40"), ("med_anticonvulsants", "84757009"),
    ("med_heparin", "Z79.01"), ("med_dmpa", "Z30.42"), ("med_dmpa", "Z79.3"),
    ("cond_idiopathic_hypercalciuria", "N20.0"), ("med_glucocorticoids", "Z92.241"),
    ("med_glucocorticoids", "T38.0X5A"), ("med_glucocorticoids", "14651005"),
}
# Value sets not used for matching a cause: shared by several causes, or known to be off
# (the VSAC Chronic Malnutrition expansion lists eating disorders), or a disease that is not the
# exposure (prostate cancer is not androgen deprivation).
SKIP_VALUE_SETS = {
    "2.16.840.1.113883.3.464.1003.199.12.1050",  # Malabsorption Syndromes (celiac, ibd, malabsorption)
    "2.16.840.1.113883.3.464.1003.199.12.1036",  # Chronic Malnutrition (expands to eating disorders)
    "2.16.840.1.113883.3.526.3.319",              # Prostate Cancer
}

# Medication exposure rules (thresholds from the reference 'thresholds'; 'derived' where no
# guideline gives a number).
MED_RULES = {
    "glucocorticoids": {"rule": "glucocorticoid_exposure", "lookback_days": 365},
    "heparin": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365, "exclude_inpatient": True,
                "exclude_text": ["flush", "lock"]},
    "anticonvulsants": {"rule": "sustained_use", "min_days": 180, "lookback_days": 365},
    "aromatase_inhibitors": {"rule": "any_use", "lookback_days": 1825},
    "androgen_deprivation": {"rule": "any_use", "lookback_days": 1825},
    "ppi": {"rule": "sustained_use", "min_days": 365, "lookback_days": 730},
    "thyroid_hormone_excess": {"rule": "current_use_with_lab", "requires_observation": "tsh_suppressed",
                               "lookback_days": 365},
    "dmpa": {"rule": "sustained_use", "min_days": 730, "lookback_days": 1095, "days_per_record": 91,
             "require_text_any": ["inject", "syringe", "depo", "subq"]},
    "thiazolidinediones": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365},
    "calcineurin_inhibitors": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365},
    "methotrexate_high_dose": {"rule": "high_dose", "min_single_dose_mg": 1000, "lookback_days": 365},
    "ssri": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365},
    "loop_diuretics": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365},
    "canagliflozin": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365},
    "tenofovir_disoproxil": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365,
                             "exclude_text": ["alafenamide"]},
    "lithium": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365},
    "warfarin": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365},
    "tamoxifen_premenopausal": {"rule": "sustained_use", "min_days": 90, "lookback_days": 365,
                                "patient": {"sex": "female", "max_age": 49}},
}
# First-generation antiandrogens preserve BMD alone: they count only beside a GnRH agent.
COMPANION_ONLY = {"bicalutamide", "flutamide", "nilutamide"}

# Lab and vital rules (cards/observations.yaml) that fire a cause where no diagnosis is coded.
OBS_RULES = {
    "hyperthyroidism": ["tsh_suppressed"], "hyperparathyroidism": ["pth_high_with_calcium_high"],
    "vitamin_d_deficiency": ["vitamin_d_low"], "ckd": ["egfr_low_persistent"],
    "low_body_weight": ["bmi_low", "weight_low"], "smoking": ["smoking_current"],
    "alcohol": ["alcohol_high"], "hypogonadism": ["testosterone_low"],
    "systemic_mastocytosis": ["tryptase_high"], "mgus": ["flc_ratio_abnormal"],
    "celiac": ["ttg_iga_positive"], "hyperprolactinemia": ["prolactin_high"],
    "hypophosphatasia": ["alp_low"], "premature_menopause": ["fsh_high_young_woman"],
    "hypercalciuria": ["urine_calcium_high"],
}
# The reference keeps these "weak and uncited" because only the original clinical summary lists them.
UNCITED = {"loop_diuretics": ["summary_bprcem2014", "summary_aging1998"],
           "warfarin": ["summary_bprcem2014", "summary_aging1998"]}
# A suppressed TSH on thyroid hormone is thyroid_hormone_excess, not hyperthyroidism.
OBS_UNLESS_ON = {"hyperthyroidism": "thyroid_hormone_excess"}
# Cause-directed workup items (cards/workup.yaml ids) per cause.
WORKUP = {
    "multiple_myeloma": ["wk_spep_flc"], "mgus": ["wk_spep_flc"], "leukemia_lymphoma": ["wk_spep_flc"],
    "celiac": ["wk_celiac"], "malabsorption": ["wk_celiac"], "ibd": ["wk_celiac"],
    "gastrectomy_bariatric": ["wk_celiac"], "vitamin_d_deficiency": ["wk_celiac"],
    "premature_menopause": ["wk_gonadal_female"], "amenorrhea": ["wk_gonadal_female", "wk_prolactin"],
    "eating_disorder": ["wk_gonadal_female"], "turner_syndrome": ["wk_gonadal_female"],
    "hypogonadism": ["wk_gonadal_male"], "klinefelter_syndrome": ["wk_gonadal_male"],
    "androgen_deprivation": [], "hyperprolactinemia": ["wk_prolactin"], "hypopituitarism": ["wk_prolactin"],
    "cushings": ["wk_cushing"], "systemic_mastocytosis": ["wk_tryptase"],
    "glucocorticoids": ["wk_vfa"],
}
PATIENT_CONSTRAINTS = {
    "hypogonadism": {"sex": "male"}, "klinefelter_syndrome": {"sex": "male"},
    "premature_menopause": {"sex": "female"}, "amenorrhea": {"sex": "female"},
    "turner_syndrome": {"sex": "female"}, "tamoxifen_premenopausal": {"sex": "female", "max_age": 49},
}
# The Chemotherapy value-set expansion is omitted in the reference: match procedure text until loaded.
PROCEDURE_TEXT = {"chemotherapy_ovarian_suppression": ["chemotherapy", "ovarian suppression"]}
# What a one-click order creates for each workup item (verified codes only; the rest of an
# item's codes are used to notice that the test was already done).
ORDER = {
    "wk_cbc": ["58410-2"], "wk_cmp": ["24323-8"], "wk_egfr": ["98979-8"], "wk_phos": ["2777-1"],
    "wk_mg": ["19123-9"], "wk_25ohd": ["62292-8"], "wk_pth": ["2731-8"], "wk_tsh": ["3016-3"],
    "wk_urine_ca": ["6874-2", "2162-6"], "wk_testosterone": ["2986-8"],
    "wk_spep_flc": ["24351-9", "36916-5", "33944-0", "48378-4"], "wk_celiac": ["31017-7", "2458-8"],
    "wk_gonadal_female": ["2243-4", "15067-2", "10501-5", "2842-3"],
    "wk_gonadal_male": ["2991-8", "10501-5", "15067-2", "2842-3"], "wk_cushing": ["2143-6"],
    "wk_tryptase": ["21582-2"], "wk_prolactin": ["2842-3"], "wk_dxa": ["77080"], "wk_vfa": ["77085"],
}
REQUIRES_CONTEXT = {"pregnancy_lactation": {"fragility_fracture_within_days": 548}}


def strength(text: str) -> str:
    t = text.lower()
    if t.startswith("strong"):
        return "strong"
    if t.startswith("moderate") or t.startswith("weak-to-moderate"):
        return "moderate"
    return "weak"


def code_entry(e: dict, role: str = "trigger") -> dict:
    out = {"system": e["system"], "code": e["code"], "display": e.get("display", ""),
           "verified": bool(e.get("verified"))}
    ct = e.get("code_type", "")
    if ct.startswith("category"):
        out["match"] = "prefix"
    if role != "trigger":
        out["role"] = role
    if e.get("note"):
        out["note"] = e["note"]
    return out


def clean_brands(brands):
    out = []
    for b in brands or []:
        b = b.strip()
        if b.startswith("("):
            b = b.strip("()").split(",")[0].strip()
            if b in ("generic",) or b.startswith("generic"):
                continue
        b = b.replace(" (osteoporosis)", "").replace(" (oncology)", "").replace(" (IM/IA)", "").replace(" (IA)", "")
        if "disc" in b and b.endswith("disc."):
            b = b.split(",")[0].strip()
        if b and not b.startswith("biosimilars"):
            out.append(b)
    return out


def ingredient_entry(e: dict) -> dict:
    out = {"name": e.get("ingredient") or e["display"].lower()}
    if e.get("code"):
        out["rxnorm"] = {"code": e["code"], "display": e["display"], "verified": bool(e.get("verified"))}
    if e.get("atc"):
        out["atc"] = {"code": e["atc"]["code"], "verified": bool(e["atc"].get("verified"))}
    brands = clean_brands(e.get("brand_names"))
    if brands:
        out["brands"] = brands
    if "prednisone_equivalent_factor" in e:
        out["prednisone_equivalent_factor"] = e["prednisone_equivalent_factor"]
    if out["name"] in COMPANION_ONLY:
        out["counts_only_with_other_ingredients"] = True
    if e.get("note"):
        out["note"] = e["note"]
    return out


def main() -> None:
    ref = yaml.safe_load(REF.read_text())
    vs_by_oid = {v["oid"]: v for v in ref["value_sets"]}
    vs_users: dict[str, set] = {}
    for c in ref["causes"]:
        for oid in c["codes"].get("value_sets", []) or []:
            vs_users.setdefault(oid, set()).add(c["id"])
    procs_by_cause: dict[str, list] = {}
    for p in ref["procedures"]:
        for cid in p["cause_ids"]:
            procs_by_cause.setdefault(cid, []).append(p)

    causes, used_vs = [], set()
    ids = {**STABLE_IDS, **OTHER_IDS}
    assert len(ids) == len(ref["causes"]), "every reference cause needs an id"
    for c in ref["causes"]:
        cid = ids[c["id"]]
        detect: dict = {}
        codes = []
        for key in ("icd10cm", "snomed", "related_secondary_hyperparathyroidism"):
            for e in c["codes"].get(key, []) or []:
                role = "supporting" if key.startswith("related") or (c["id"], e["code"]) in SUPPORTING else "trigger"
                codes.append(code_entry(e, role))
        for p in procs_by_cause.get(c["id"], []):
            for e in p["codes"]:
                ce = code_entry(e)
                ce["procedure_group"] = p["id"]
                codes.append(ce)
        if codes:
            detect["codes"] = codes
        vsets = [oid for oid in (c["codes"].get("value_sets") or [])
                 if oid not in SKIP_VALUE_SETS and len(vs_users.get(oid, ())) == 1]
        for p in procs_by_cause.get(c["id"], []):
            vsets += [oid for oid in p.get("value_sets") or [] if oid not in vsets and oid not in SKIP_VALUE_SETS]
        if vsets:
            detect["value_sets"] = vsets
            used_vs.update(vsets)
        ingr = c["codes"].get("rxnorm_ingredients")
        if ingr:
            med = dict(MED_RULES[cid])
            med["ingredients"] = [ingredient_entry(e) for e in ingr]
            if c["codes"].get("excluded_ingredients"):
                med["excluded_ingredients"] = [ingredient_entry(e) for e in c["codes"]["excluded_ingredients"]]
            if c["codes"].get("rxnorm_products"):
                med["products"] = [code_entry(e) for e in c["codes"]["rxnorm_products"]]
            if c.get("routes"):
                med["routes"] = c["routes"]
            if c.get("dose_computation"):
                med["dose_computation"] = c["dose_computation"]
            detect["medications"] = med
        elif cid in MED_RULES:
            raise SystemExit(f"{cid}: medication rule without ingredients")
        if cid in PROCEDURE_TEXT:
            detect["procedure_text"] = PROCEDURE_TEXT[cid]
        if cid in OBS_RULES:
            detect["observations"] = OBS_RULES[cid]
        if cid in OBS_UNLESS_ON:
            detect["observations_unless_on_medication_of"] = OBS_UNLESS_ON[cid]
        if cid in PATIENT_CONSTRAINTS:
            detect["patient"] = PATIENT_CONSTRAINTS[cid]
        if cid in REQUIRES_CONTEXT:
            detect["requires"] = REQUIRES_CONTEXT[cid]
        policy = {"fires_alone": True}
        if cid in LISTED_ONLY:
            policy = {"fires_alone": False, "reason": LISTED_ONLY[cid]}
        elif cid in ALWAYS_WITH_OTHERS:
            policy = {"fires_alone": False, "reason": ALWAYS_WITH_OTHERS[cid]}
        card = c.get("card") or {}
        causes.append({
            "id": cid,
            "reference_id": c["id"],
            "label": c["label"],
            "category": c["category"],
            "strength": strength(c["evidence_strength"]),
            "strength_detail": c["evidence_strength"],
            "policy": policy,
            "citations": c.get("citations") or UNCITED[cid],
            "thresholds": c.get("thresholds", []),
            "detect": detect,
            "workup": WORKUP.get(cid, []),
            "card": {"summary": card.get("summary", c["label"]), "actions": card.get("actions", []),
                     "citations": card.get("citations", c.get("citations", []))},
        })

    header = ("# Cause catalog: one entry per cause of secondary osteoporosis.\n"
              "# Imported from shared/reference/cause-catalog-reference.yaml by tools/import_reference.py,\n"
              "# then reviewed. Codes keep the reference's `verified` flag; `role: supporting` codes are shown\n"
              "# as context and never fire a cause; `match: prefix` ICD-10-CM codes match their descendants.\n")
    (OUT / "causes.yaml").write_text(header + yaml.safe_dump({"causes": causes}, sort_keys=False, width=120, allow_unicode=True))

    # value-set expansions that the catalog matches on, plus those used by detection lists
    det = ref["existing_dxa_detection"]
    vs_out = []
    for oid in sorted(used_vs | set(det["value_sets"]) | set(ref["index_condition_codes"]["value_sets"])):
        v = vs_by_oid[oid]
        stored = v.get("codes") if isinstance(v.get("codes"), list) else []
        entry = {"oid": oid, "name": v["name"], "url": v["url"], "code_counts": v["code_counts"],
                 "stored_codes": len(stored)}
        if not stored:
            entry["note"] = "expansion omitted in the reference (large); load it from VSAC before relying on it"
        entry["codes"] = [{"system": x["system"], "code": x["code"], "display": x.get("display", "")} for x in stored]
        vs_out.append(entry)
    (OUT / "value_sets.yaml").write_text(
        "# VSAC value-set expansions as found in the reference (some are partial: stored_codes < code_counts).\n"
        + yaml.safe_dump({"value_sets": vs_out}, sort_keys=False, width=160, allow_unicode=True))

    def codes(lst):
        return [code_entry(e) for e in lst]
    detection = {
        "existing_dxa": {k: codes(v) for k, v in det.items() if k not in ("value_sets", "recency_rule")},
        "existing_dxa_value_sets": det["value_sets"],
        "existing_dxa_recency_days": 730,
        "existing_dxa_rule": det["recency_rule"],
        "osteoporosis_treatment": {
            "ingredients": [ingredient_entry(e) for e in ref["existing_treatment_detection"]["ingredients"]],
            "other_codes": codes(ref["existing_treatment_detection"]["other_codes"]),
            "rule": ref["existing_treatment_detection"]["rule"],
        },
        "index_conditions": {k: codes(v) for k, v in ref["index_condition_codes"].items() if k != "value_sets"},
        # grouped by hand after import (osteoporosis / osteopenia / fragility_fracture_history)
        "index_condition_value_sets": {"osteoporosis": ref["index_condition_codes"]["value_sets"]},
        "workup": {tier: [{"id": w["id"], "label": w["label"], "why": w.get("why", ""),
                           "citations": w.get("citations", []), "order": ORDER[w["id"]],
                           "codes": codes(w["codes"]),
                           **({"applies_to": w["applies_to"]} if w.get("applies_to") else {}),
                           **({"when": w["when"]} if w.get("when") else {}),
                           **({"note": w["note"]} if w.get("note") else {})}
                          for w in ref["workup"][tier]] for tier in ("baseline", "cause_directed", "imaging")},
    }
    (OUT / "detection.yaml").write_text(
        "# Workup tests, existing-DXA / existing-treatment detection and index conditions (from the reference).\n"
        + yaml.safe_dump(detection, sort_keys=False, width=120, allow_unicode=True))
    (OUT / "citations.yaml").write_text(
        "# Guideline citations (ids are used by causes, rules and cards).\n"
        + yaml.safe_dump({"citations": ref["citations"]}, sort_keys=False, width=160, allow_unicode=True))
    print(f"{len(causes)} causes, {len(vs_out)} value sets")


def cli(argv: list[str] | None = None) -> int:
    import argparse
    global REF, OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Reviewed catalog files are never overwritten without --force.")
    ap.add_argument("reference", nargs="?", default=str(REF), help="the reference YAML (default: %(default)s)")
    ap.add_argument("--out", default=str(OUT), help="folder to write (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="overwrite catalog files already in --out")
    args = ap.parse_args(argv)
    REF, OUT = Path(args.reference), Path(args.out)
    existing = [name for name in OUTPUTS if (OUT / name).exists()]
    if existing and not args.force:
        print(f"import_reference: {OUT} already holds {', '.join(existing)} (reviewed content?): "
              "refusing to overwrite without --force", file=sys.stderr)
        return 2
    if not REF.exists():
        print(f"import_reference: no reference at {REF}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    main()
    print(f"import_reference: wrote {', '.join(OUTPUTS)} to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
