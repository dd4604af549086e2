"""Issue 20: real exports as they come. Each test builds the chart the way an export family writes it: pharmacy
fills (MedicationDispense) with NDCs or plan drug keys and no sig, local formulary codes with the product name only in
text, free-text and tapering sigs, results as strings with comparators or in SI units under a local code, creatinine
without an eGFR, dialysis known only from its sessions, problem-list text, and diagnoses that are only suspected.
None uses the catalog's own RxNorm or LOINC codes where the export family would not."""
from __future__ import annotations

import io
import json
import sys

import pytest

from cds_service.services import explain
from cds_service.clinical.survey import BY_TEXT, COMPUTED, SUSPECTED, run as survey

from .conftest import AS_OF, ROOT
from .conftest import view as view_bundle

sys.path.insert(0, str(ROOT))
from fixtures.generate import ICD, SCT, UCUM, Patient, day  # noqa: E402

NDC = "http://hl7.org/fhir/sid/ndc"
LOCAL_RX = "urn:oid:2.16.840.1.113883.19.41.1"              # a VA-style local drug file (HL7 example OID arc)
LOCAL_LAB = "https://lab.example.org/fhir/CodeSystem/tests"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10_DX = "http://hl7.org/fhir/sid/icd-10-cm"


def view(registry, p: Patient):
    """(card or None, assessment) at chart open."""
    return view_bundle(registry, p.bundle())


def plain(card: dict) -> str:
    return (card["summary"] + "\n" + card["detail"]).replace("\\", "")


def found(assessment) -> dict[str, object]:
    return {f.cause.id: f for f in assessment.findings}


def fill(p: Patient, text: str, code: str | None, system: str, days_ago: int, supply: int | None, qty: float,
         sig: str | None = None) -> dict:
    """A pharmacy claim or dispensing record: a product code and name, the day handed over, quantity, days' supply."""
    med = {"text": text}
    if code:
        med["coding"] = [{"system": system, "code": code, "display": text}]
    r = {"resourceType": "MedicationDispense", "status": "completed", "medicationCodeableConcept": med,
         "subject": p.subject, "whenHandedOver": day(days_ago) + "T16:05:00-05:00",
         "quantity": {"value": qty, "unit": "TAB", "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
                      "code": "TAB"}}
    if supply is not None:
        r["daysSupply"] = {"value": supply, "unit": "Day", "system": UCUM, "code": "d"}
    if sig:
        r["dosageInstruction"] = [{"text": sig}]
    return p.add(r)


def local_order(p: Patient, text: str, code: str, start: int, sig: str, status: str = "active", supply=None,
                qty=None, refills=None, patient_instruction: str | None = None) -> dict:
    """An order under a local drug-file code, the product only in text, the sig only as text."""
    dosage = {"text": sig}
    if patient_instruction:
        dosage = {"patientInstruction": patient_instruction}
    r = {"resourceType": "MedicationRequest", "status": status, "intent": "order",
         "medicationCodeableConcept": {"coding": [{"system": LOCAL_RX, "code": code, "display": text}], "text": text},
         "subject": p.subject, "authoredOn": day(start), "dosageInstruction": [dosage]}
    if supply or qty:
        r["dispenseRequest"] = {}
        if supply:
            r["dispenseRequest"]["expectedSupplyDuration"] = {"value": supply, "unit": "days", "system": UCUM, "code": "d"}
        if qty:
            r["dispenseRequest"]["quantity"] = {"value": qty, "unit": "TAB"}
        if refills is not None:
            r["dispenseRequest"]["numberOfRepeatsAllowed"] = refills
    return p.add(r)


def lab(p: Patient, local: str, text: str, days_ago: int, value=None, unit=None, string=None, comparator=None,
        loinc: str | None = None, interpretation: str | None = None, low=None, high=None) -> dict:
    """A result the hospital style way: the local code first, LOINC second (or only in the text)."""
    coding = [{"system": LOCAL_LAB, "code": local, "display": text}]
    if loinc:
        coding.append({"system": "http://loinc.org", "code": loinc})
    r = {"resourceType": "Observation", "status": "final", "code": {"coding": coding, "text": text},
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                   "code": "laboratory"}]}],
         "subject": p.subject, "effectiveDateTime": day(days_ago) + "T07:40:00Z"}
    if string is not None:
        r["valueString"] = string
    else:
        r["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
        if comparator:
            r["valueQuantity"]["comparator"] = comparator
    if interpretation:
        r["interpretation"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                            "code": interpretation}]}]
    if low is not None or high is not None:
        r["referenceRange"] = [{k: {"value": v, "unit": unit, "system": UCUM, "code": unit}
                                for k, v in (("low", low), ("high", high)) if v is not None}]
    return p.add(r)


def encounter_dx(p: Patient, system: str, code: str, display: str, days_ago: int, verification: str | None = None) -> dict:
    """A billing diagnosis from a visit: category encounter-diagnosis, often no clinical status."""
    r = {"resourceType": "Condition",
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                   "code": "encounter-diagnosis"}]}],
         "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
         "subject": p.subject, "recordedDate": day(days_ago)}
    if verification:
        r["verificationStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": verification}]}
    return p.add(r)


# ---- 1. dispenses as exposure ---------------------------------------------------------------------------------------
def test_five_prednisone_fills_are_a_long_course_shown_as_fills(registry):
    """Payer feed: five fills of an NDC-coded product, quantity and days' supply, no order and no sig."""
    p = Patient("fills-pred", age=67, style="searchset")
    for n in range(5):
        fill(p, "PREDNISONE 10 MG ORAL TABLET", "0591-5442-01", NDC, days_ago=20 + 75 * n, supply=60, qty=60)
    card, a = view(registry, p)
    assert "glucocorticoids" in found(a)
    text = plain(card)
    assert "PREDNISONE 10 MG ORAL TABLET: 5 fills" in text and "days covered in the last 365 days" in text
    assert "10 mg/day prednisone-equivalent" in text            # 60 tablets of 10 mg over 60 days


def test_a_single_burst_fill_is_not_long_term(registry):
    p = Patient("fills-burst", age=58, style="searchset")
    fill(p, "PREDNISONE 10 MG ORAL TABLET", "0591-5442-01", NDC, days_ago=40, supply=5, qty=20)
    card, a = view(registry, p)
    assert card is None and "glucocorticoids" not in found(a)


def test_fifteen_months_of_ppi_fills_count_and_late_refills_are_one_course(registry):
    """Monthly esomeprazole fills, each collected a week or two late: bridged into one course of over a year."""
    p = Patient("fills-ppi", age=71, style="searchset")
    for n in range(15):
        fill(p, "esomeprazole 40 MG Delayed Release Oral Capsule", "606726", "http://www.nlm.nih.gov/research/umls/rxnorm",
             days_ago=15 + 40 * n, supply=30, qty=30)
    _, a = view(registry, p)
    assert "ppi" in found(a)
    line = next(e.text for e in found(a)["ppi"].evidence if "fills" in e.text)
    assert line.startswith("esomeprazole 40 MG Delayed Release Oral Capsule: 15 fills")


def test_an_order_and_its_fills_are_counted_once(registry):
    """The order and the pharmacy's fills of it describe one course: the days are not added twice."""
    p = Patient("fills-and-order", age=66, style="searchset")
    p.med_request("predniSONE 5 MG Oral Tablet", "312617", start=100, dose=5, per_day=1, supply=100)
    fill(p, "predniSONE 5 MG Oral Tablet", "312617", "http://www.nlm.nih.gov/research/umls/rxnorm", days_ago=100,
         supply=50, qty=50)
    fill(p, "predniSONE 5 MG Oral Tablet", "312617", "http://www.nlm.nih.gov/research/umls/rxnorm", days_ago=50,
         supply=50, qty=50)
    _, a = view(registry, p)
    gc = found(a)["glucocorticoids"]
    assert any("101 days so far" in e.text for e in gc.evidence), [e.text for e in gc.evidence]


def test_dispenses_are_in_the_prefetch_templates_and_optional(registry, client):
    discovery = client.get("/cds-services").get_json()
    gc = next(s for s in discovery["services"] if s["id"] == "secondary-osteoporosis")
    assert gc["prefetch"]["medicationDispenses"].startswith("MedicationDispense?patient={{context.patientId}}")


# ---- 2. drug identity without RxNorm --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, code, system", [
    ("PREDNISONE 20MG TAB", "NDF-2216", LOCAL_RX),                       # VA drug file, ALL CAPS
    ("PREDNISONE 10 MG ORAL TABLET", "0591-5442-01", NDC),               # NDC with the product in text
    ("predniSONE 20 MG Oral Tablet [Deltasone]", "2", "https://ehr.example.org/fhir/CodeSystem/erx"),
])
def test_a_drug_coded_locally_is_read_by_its_product_text_with_strength(registry, text, code, system):
    p = Patient("local-" + code.lower().replace(".", ""), age=64, style="searchset")
    r = local_order(p, text, code, start=200, sig="TAKE ONE TABLET BY MOUTH EVERY MORNING")
    r["medicationCodeableConcept"]["coding"][0]["system"] = system
    _, a = view(registry, p)
    gc = found(a)["glucocorticoids"]
    strength = 20 if "20" in text else 10
    assert any(f"{strength} mg/day" in e.text for e in gc.evidence), [e.text for e in gc.evidence]


def test_a_branded_rxnorm_product_resolves_to_its_ingredient(registry):
    """Tegretol suspension under its branded (SBD) RxNorm code: carbamazepine, an anticonvulsant."""
    p = Patient("sbd-carbamazepine", age=55)
    p.med_request("carbamazepine 20 MG/ML Oral Suspension [Tegretol]", "308971", start=500, dose=10, dose_unit="mL",
                  per_day=2)
    _, a = view(registry, p)
    assert "anticonvulsants" in found(a)


def test_a_contained_medication_with_a_local_code_is_read(registry):
    p = Patient("contained-local", age=70, style="searchset")
    r = local_order(p, "x", "RX-1", start=300, sig="Take 1 tablet (5 mg total) by mouth daily.")
    del r["medicationCodeableConcept"]
    r["contained"] = [{"resourceType": "Medication", "id": "med1",
                       "code": {"coding": [{"system": LOCAL_RX, "code": "RX-20712"}], "text": "PREDNISONE 5MG TAB"}}]
    r["medicationReference"] = {"reference": "#med1"}
    _, a = view(registry, p)
    assert "glucocorticoids" in found(a)


# ---- 3. free-text sigs ----------------------------------------------------------------------------------------------
def test_a_taper_written_as_text_is_read_step_by_step(registry):
    """A 4-week taper is a burst, not long-term therapy; it is shown as one taper line."""
    p = Patient("taper-text", age=61)
    local_order(p, "PREDNISONE 10 MG TABLET", "RX-20713", start=60,
                sig="40 mg x 7 d, then 30 mg x 7 d, then 20 mg x 7 d, then 10 mg x 7 d, then stop", status="completed")
    _, a = view(registry, p)
    exposures = [m for m in a.record.medications if m.taper]
    assert [m.daily_mg for m in exposures] == [40, 30, 20, 10]
    assert (exposures[-1].end - exposures[0].start).days + 1 == 28
    assert "glucocorticoids" not in found(a)


def test_alternate_day_dosing_is_averaged(registry):
    p = Patient("alternate-day", age=59, style="searchset")
    local_order(p, "PREDNISONE 10 MG TABLET", "RX-20713", start=300, sig="Take 3 tablets (30 mg) by mouth every other day")
    _, a = view(registry, p)
    gc = found(a)["glucocorticoids"]
    assert any("15 mg/day" in e.text for e in gc.evidence), [e.text for e in gc.evidence]


def test_a_prn_course_counts_only_what_was_dispensed(registry):
    """'as needed' with one 10-tablet fill is ten days at most, however long the order stays active."""
    p = Patient("prn-pred", age=66, style="searchset")
    local_order(p, "PREDNISONE 20 MG TABLET", "RX-20714", start=400, sig="Take 1 tablet by mouth daily as needed for gout flare",
                qty=10)
    _, a = view(registry, p)
    assert "glucocorticoids" not in found(a) or not found(a)["glucocorticoids"].fires_alone


def test_a_sig_that_cannot_be_read_says_dose_not_recorded(registry):
    p = Patient("sig-unreadable", age=68, style="searchset")
    local_order(p, "PREDNISONE 5 MG TABLET", "RX-20712", start=400, sig="Use as directed per rheumatology")
    card, a = view(registry, p)
    gc = found(a).get("glucocorticoids")
    assert gc is not None
    assert any("dose not recorded" in e.text for e in gc.evidence), [e.text for e in gc.evidence]


def test_patient_instruction_is_read_when_there_is_no_sig(registry):
    p = Patient("patient-instruction", age=66, style="searchset")
    local_order(p, "PREDNISONE 5 MG TABLET", "RX-20712", start=300, sig="", patient_instruction="Take 2 tablets by mouth once daily")
    _, a = view(registry, p)
    assert any("10 mg/day" in e.text for e in found(a)["glucocorticoids"].evidence)


# ---- 4. lab values as recorded --------------------------------------------------------------------------------------
def test_a_tsh_reported_as_a_string_below_the_assay_limit_is_suppressed(registry):
    p = Patient("tsh-string", age=74, style="searchset")
    local_order(p, "ARMOUR THYROID 90 MG TAB", "ERX-771040", start=700, sig="TAKE 1 TAB BY MOUTH DAILY")
    lab(p, "TSH3", "TSH, 3rd generation", 30, string="<0.005", loinc="11580-8")
    _, a = view(registry, p)
    assert any(e.text.startswith("Suppressed TSH: <0.005 mIU/L") for e in found(a)["thyroid_hormone_excess"].evidence)


def test_vitamin_d_in_nmol_per_litre_under_a_local_code_with_loinc_in_text(registry):
    """25-OH vitamin D 20 nmol/L = 8 ng/mL (factor 2.496, the LOINC molar/mass pair) with the LOINC only in the text."""
    p = Patient("vitd-si", age=69, style="collection")
    lab(p, "VITD25", "25-OH Vitamin D (LOINC 62292-8)", 40, value=20, unit="nmol/L")
    _, a = view(registry, p)
    assert "vitamin_d_deficiency" in found(a)


def test_a_comparator_on_a_quantity_is_kept_and_shown(registry):
    p = Patient("vitd-comparator", age=69, style="searchset")
    lab(p, "VITD25", "Vitamin D, 25-Hydroxy", 40, value=7, unit="ng/mL", comparator="<", loinc="1989-3")
    _, a = view(registry, p)
    assert [e.text for e in found(a)["vitamin_d_deficiency"].evidence] == ["Low 25-hydroxyvitamin D: <7 ng/mL on "
                                                                          + a.record.results(["1989-3"])[0].when.isoformat()]


def test_a_normal_egfr_string_is_not_kidney_disease(registry):
    p = Patient("egfr-string", age=70, style="searchset")
    lab(p, "EGFR", "eGFR (CKD-EPI 2021)", 200, string=">90", loinc="98979-8")
    lab(p, "EGFR", "eGFR (CKD-EPI 2021)", 20, string=">90", loinc="98979-8")
    _, a = view(registry, p)
    assert "ckd" not in found(a)


@pytest.mark.parametrize("value, unit, canonical", [(4.0, "pmol/L", 37.7), (2.2, "mmol/L", None)])
def test_pth_and_calcium_in_si_units_are_converted(registry, value, unit, canonical):
    """PTH 20 pmol/L = 188.6 pg/mL with calcium 2.7 mmol/L = 10.8 mg/dL: primary hyperparathyroidism's pattern."""
    p = Patient("pth-si-" + unit.replace("/", ""), age=63, style="collection")
    lab(p, "PTH", "PTH, intact", 30, value=20, unit="pmol/L", loinc="2731-8")
    lab(p, "CA", "Calcium", 30, value=2.7, unit="mmol/L", loinc="17861-6")
    _, a = view(registry, p)
    pth = a.record.results(["2731-8"])[0]
    assert round(pth.value, 1) == 188.6
    assert "hyperparathyroidism" in found(a)


# ---- 5. computed eGFR -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, unit, loinc", [(1.6, "mg/dL", "2160-0"), (141, "umol/L", "14682-9")])
def test_egfr_is_computed_from_creatinine_when_none_was_reported(registry, value, unit, loinc):
    """Creatinine 1.6 mg/dL (141 umol/L) in a 72-year-old woman, twice 4 months apart: eGFR about 33 by CKD-EPI 2021."""
    p = Patient("creat-only-" + loinc, age=72, style="collection")
    for days_ago in (160, 20):
        lab(p, "CREA", "Creatinine, serum", days_ago, value=value, unit=unit, loinc=loinc)
    card, a = view(registry, p)
    assert "ckd" in found(a)
    text = plain(card)
    assert "computed from creatinine" in text and "CKD-EPI 2021" in text
    egfr = a.record.results(["98979-8"])[0]
    assert 30 <= egfr.value <= 36


def test_a_reported_egfr_is_never_replaced_by_a_computed_one(registry):
    p = Patient("creat-and-egfr", age=72, style="collection")
    lab(p, "CREA", "Creatinine, serum", 20, value=1.6, unit="mg/dL", loinc="2160-0")
    lab(p, "EGFR", "eGFR", 20, value=64, unit="mL/min/{1.73_m2}", loinc="98979-8")
    _, a = view(registry, p)
    assert [m.value for m in a.record.results(["98979-8"])] == [64]


# ---- 6. procedures and text as evidence -----------------------------------------------------------------------------
def test_dialysis_known_only_from_its_sessions_is_end_stage_kidney_disease(registry):
    p = Patient("dialysis-sessions", age=58, style="searchset")
    for days_ago in (60, 30, 10):
        p.procedure(CPT, "90935", "HEMODIALYSIS, SINGLE EVAL", days_ago=days_ago)
    _, a = view(registry, p)
    assert "ckd" in found(a)


def test_dialysis_sessions_years_ago_are_past_the_evidence_age(registry):
    p = Patient("dialysis-old", age=58, style="searchset")
    p.procedure(CPT, "90935", "HEMODIALYSIS, SINGLE EVAL", days_ago=2500)
    _, a = view(registry, p)
    assert "ckd" not in found(a)


@pytest.mark.parametrize("text, cause", [("Dialysis dependent", "ckd"), ("Emphysema lung", "copd"),
                                         ("Dependence on hemodialysis", "ckd")])
def test_problem_list_text_names_the_cause(registry, text, cause):
    p = Patient("text-" + text.split()[0].lower(), age=67)
    p.condition(None, None, text)
    _, a = view(registry, p)
    assert cause in found(a)


def test_non_cystic_fibrosis_bronchiectasis_is_not_cystic_fibrosis(registry):
    p = Patient("non-cf", age=60)
    p.condition(None, None, "Non-cystic fibrosis bronchiectasis")
    _, a = view(registry, p)
    assert "cystic_fibrosis" not in found(a)


def test_bariatric_surgery_known_from_a_claim_procedure(registry):
    p = Patient("bariatric-claim", age=49, style="searchset")
    p.procedure(CPT, "43644", "LAP GASTRIC BYPASS/ROUX-EN-Y", days_ago=900)
    _, a = view(registry, p)
    assert "gastrectomy_bariatric" in found(a)


# ---- 7. certainty ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("display, verification", [
    ("R/O multiple myeloma", None), ("Rule out multiple myeloma", None), ("Multiple myeloma?", None),
    ("Multiple myeloma", "provisional"), ("Multiple myeloma", "differential"), ("Multiple myeloma", "unconfirmed"),
])
def test_a_suspected_myeloma_is_listed_never_fired(registry, display, verification):
    p = Patient("ro-myeloma", age=71, style="searchset")
    encounter_dx(p, ICD10_DX, "C90.00", display, 30, verification)
    card, a = view(registry, p)
    assert card is None
    f = found(a)["multiple_myeloma"]
    assert f.suspected and not f.fires_alone
    line = json.dumps(explain(a))
    assert "suspected" in line


def test_a_refuted_problem_outranks_encounter_diagnoses_of_it(registry):
    """COPD refuted on the problem list (spirometry normal); the visit billing codes of months before and after
    still carry J44.9: no COPD."""
    p = Patient("refuted-copd", age=66, style="searchset")
    p.condition(SCT, "13645005", "Chronic obstructive lung disease", clinical="inactive", verification="refuted", onset=200)
    encounter_dx(p, ICD10_DX, "J44.9", "COPD, unspecified", 300)
    encounter_dx(p, ICD10_DX, "J44.9", "COPD, unspecified", 60)
    _, a = view(registry, p)
    assert "copd" not in found(a)


def test_a_resolved_problem_outranks_older_encounter_diagnoses_but_not_a_new_one(registry):
    p = Patient("resolved-graves", age=52, style="searchset")
    p.condition(SCT, "353295004", "Graves disease", clinical="resolved", onset=300)
    encounter_dx(p, ICD10_DX, "E05.00", "Thyrotoxicosis with diffuse goiter", 400)
    _, a = view(registry, p)
    assert "hyperthyroidism" not in found(a)
    encounter_dx(p, ICD10_DX, "E05.00", "Thyrotoxicosis with diffuse goiter", 20)        # relapse, coded at a visit
    _, a = view(registry, p)
    assert "hyperthyroidism" in found(a)


def test_a_confirmed_problem_stands_beside_a_rule_out_visit_code(registry):
    p = Patient("confirmed-and-ro", age=57)
    p.condition(ICD, "K90.0", "Celiac disease", onset=900)
    encounter_dx(p, ICD10_DX, "K90.0", "R/O celiac disease", 30)
    _, a = view(registry, p)
    assert "celiac" in found(a) and not found(a)["celiac"].suspected


def test_certainty_cues_are_catalog_data_with_their_source(catalog):
    import yaml
    detection = yaml.safe_load((ROOT / "cards" / "detection.yaml").read_text())
    cues = detection["condition_text"]
    assert "rule out" in cues["cues_before"]["uncertain"] and "r/o" in cues["cues_before"]["uncertain"]
    assert "Chapman" in cues["source"]
    statuses = yaml.safe_load((ROOT / "cards" / "catalog.yaml").read_text())["statuses"]
    assert set(statuses["condition_verification_suspected"]) == {"unconfirmed", "provisional", "differential"}


# ---- the code survey ------------------------------------------------------------------------------------------------
def test_the_code_survey_lists_drug_codes_read_by_text_computed_egfrs_and_suspected_diagnoses(catalog, tmp_path):
    p = Patient("survey-site", age=72, style="searchset")
    fill(p, "PREDNISONE 10 MG ORAL TABLET", "0591-5442-01", NDC, days_ago=20, supply=30, qty=30)
    lab(p, "CREA", "Creatinine, serum", 20, value=1.6, unit="mg/dL", loinc="2160-0")
    encounter_dx(p, ICD10_DX, "C90.00", "R/O multiple myeloma", 30)
    (tmp_path / "chart.json").write_text(json.dumps(p.bundle()))
    out, err = io.StringIO(), io.StringIO()
    assert survey(catalog, [str(tmp_path)], unmatched=True, as_csv=False, out=out, err=err, as_of=AS_OF) == 0
    rows = [line.split("\t") for line in out.getvalue().splitlines()[1:]]
    by_kind = {r[0]: r for r in rows if r[0] in (BY_TEXT, SUSPECTED, COMPUTED)}
    assert by_kind[BY_TEXT][1:3] == [NDC, "0591-5442-01"] and "glucocorticoids (prednisone)" in by_kind[BY_TEXT][5]
    assert by_kind[SUSPECTED][2] == "C90.00" and "multiple_myeloma" in by_kind[SUSPECTED][5]
    assert by_kind[COMPUTED][2] == "2160-0"
    assert "1 drug codes read by their text, 1 suspected diagnoses, eGFR computed from 1 creatinine codes" in err.getvalue()
