"""Findings: exposure logic, statuses, units, thresholds, time as an input, and the labelled set."""
from __future__ import annotations

import sys
from datetime import date, timedelta

import pytest

from cds_service.fhir.bundles import request_from_bundle
from cds_service.fhir.fhir_client import FhirClient
from cds_service.services import SecondaryOsteoporosis, Toolkit, explain

from .conftest import AS_OF, LABELS, ROOT, load_fixture

sys.path.insert(0, str(ROOT))
from fixtures.generate import ICD, Patient, ra  # noqa: E402


@pytest.fixture(scope="module")
def service(catalog):
    return SecondaryOsteoporosis(Toolkit(catalog, FhirClient()))


def run(service, p: Patient, as_of: date = AS_OF):
    return service.invoke(request_from_bundle(p.bundle()), as_of)


def causes(service, p: Patient, as_of: date = AS_OF) -> dict:
    return {f.cause.id: f for f in run(service, p, as_of).assessment.findings}


# ---- glucocorticoids ------------------------------------------------------------------------
def test_prednisone_equivalent_from_structured_dose(service):
    p = Patient("gc1")
    p.med_request("dexamethasone 4 MG Oral Tablet", "3264", start=120, dose=4)
    f = causes(service, p)["glucocorticoids"]
    assert f.tier == "high"                                  # 4 mg dexamethasone = 26.7 mg prednisone
    assert any("26.7 mg/day prednisone-equivalent" in e.text for e in f.evidence)      # one decimal
    assert "acr2022" in f.citations


def test_dose_from_dosage_text_only(service):
    p = Patient("gc2")
    p.med_statement("prednisone 5 MG Oral Tablet", None, start=100, text="Take 4 tablets (20 mg total) by mouth daily")
    f = causes(service, p)["glucocorticoids"]
    assert any("20 mg/day" in e.text for e in f.evidence) and f.tier == "high"


def test_tablet_count_times_strength_and_twice_daily_text(service):
    p = Patient("gc3")
    p.med_statement("prednisolone 5 MG Oral Tablet", None, start=100, text="take one tablet by mouth twice daily")
    f = causes(service, p)["glucocorticoids"]
    assert any("10 mg/day" in e.text for e in f.evidence)


def test_below_2_5_mg_per_day_does_not_count(service):
    p = Patient("gc4")
    p.med_request("prednisone 1 MG Oral Tablet", "8640", start=300, dose=2)
    assert "glucocorticoids" not in causes(service, p)


def test_short_course_does_not_count_but_planned_three_months_does(service):
    short = Patient("gc5")
    short.med_request("prednisone 10 MG Oral Tablet", "8640", status="completed", start=40, dose=40, supply=10)
    assert "glucocorticoids" not in causes(service, short)
    planned = Patient("gc6")            # started a week ago, 30-day supply with 2 refills: 90 days planned
    planned.med_request("prednisone 10 MG Oral Tablet", "8640", start=7, dose=10, supply=30, repeats=2)
    assert causes(service, planned)["glucocorticoids"].tier == "high"


@pytest.mark.parametrize("route_text, display", [
    ("Inhalation", "budesonide 0.5 MG/ML Inhalation Suspension"),
    ("Nasal", "mometasone nasal spray"),
    (None, "dexamethasone 0.1 % Ophthalmic Suspension"),
    (None, "hydrocortisone 2.5 % Topical Cream"),
    (None, "hydrocortisone 100 MG/60ML Enema"),
    ("Intra-articular", "methylprednisolone acetate 40 MG/ML Injectable Suspension"),
])
def test_non_systemic_routes_do_not_count(service, route_text, display):
    p = Patient("gc7")
    p.med_request(display, None, start=300, dose=40, route=route_text)
    assert "glucocorticoids" not in causes(service, p)


def test_very_high_dose_tier_and_warning(service):
    p = Patient("gc8")
    p.med_request("prednisone 20 MG Oral Tablet", "8640", start=100, dose=40)
    result = run(service, p)
    assert {f.cause.id: f for f in result.assessment.findings}["glucocorticoids"].tier == "very_high"
    card = result.response["cards"][0]
    assert card["indicator"] == "warning" and "very high dose" in card["summary"]


def test_unknown_dose_counts_by_duration_per_cms249(service):
    p = Patient("gc9")
    p.med_request("prednisone 5 MG Oral Tablet", "8640", start=200)      # no dose at all
    f = causes(service, p)["glucocorticoids"]
    assert f.tier == "dose_not_recorded" and "cms249" in f.citations


def test_same_drug_in_request_and_statement_is_not_double_counted(service):
    p = Patient("gc10")
    p.med_request("prednisone 1 MG Oral Tablet", "8640", start=200, dose=2)
    p.med_statement("prednisone 1 MG Oral Tablet", "8640", start=200, text="2 mg daily")
    assert "glucocorticoids" not in causes(service, p)                     # 2 mg/day, not 4


def test_fludrocortisone_is_not_a_glucocorticoid(service):
    p = Patient("gc11")
    p.med_request("fludrocortisone acetate 0.1 MG Oral Tablet", "4452", start=500, dose=0.1)
    assert "glucocorticoids" not in causes(service, p)


# ---- statuses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(clinical="resolved"), dict(clinical="remission"), dict(clinical="inactive"),
                                dict(verification="refuted"), dict(verification="entered-in-error")])
def test_condition_status_that_does_not_count(service, kw):
    p = Patient("st1")
    p.condition(ICD, "M32.9", "Systemic lupus erythematosus", **kw)
    assert "sle" not in causes(service, p)


@pytest.mark.parametrize("clinical", ["active", "recurrence", "relapse"])
def test_condition_status_that_counts(service, clinical):
    p = Patient("st2")
    p.condition(ICD, "M32.9", "Systemic lupus erythematosus", clinical=clinical)
    assert "sle" in causes(service, p)


@pytest.mark.parametrize("status", ["stopped", "entered-in-error", "cancelled", "draft"])
def test_medication_request_status_that_does_not_count(service, status):
    p = Patient("st3")
    p.med_request("anastrozole 1 MG Oral Tablet", "84857", status=status, start=100, dose=1)
    assert "aromatase_inhibitors" not in causes(service, p)


def test_not_taken_statement_and_do_not_perform_request_do_not_count(service):
    p = Patient("st4")
    p.med_statement("anastrozole 1 MG Oral Tablet", "84857", status="not-taken", start=100)
    req = p.med_request("anastrozole 1 MG Oral Tablet", "84857", start=100, dose=1)
    req["doNotPerform"] = True
    assert "aromatase_inhibitors" not in causes(service, p)


def test_medication_ended_before_look_back_does_not_count(service):
    p = Patient("st5")
    p.med_statement("omeprazole 20 MG Oral Capsule", "7646", status="completed", start=2000, end=900)
    assert "ppi" not in causes(service, p)


def test_preliminary_and_cancelled_observations_do_not_count(service):
    p = Patient("st6")
    p.obs("62292-8", "25-OH vitamin D", 8, "ng/mL", 20, status="preliminary")
    p.obs("62292-8", "25-OH vitamin D", 8, "ng/mL", 10, status="entered-in-error")
    assert "vitamin_d_deficiency" not in causes(service, p)


# ---- matching ---------------------------------------------------------------------------------
def test_icd10_prefix_matches_descendants_with_or_without_dots(service):
    for code in ("E05.00", "E0500", "e05.9"):
        p = Patient("m1")
        p.condition(ICD, code, "Thyrotoxicosis")
        assert "hyperthyroidism" in causes(service, p), code


def test_medication_found_by_atc_brand_and_text(service):
    atc = Patient("m2")
    r = atc.med_request("Local formulary item 123", None, start=500, dose=20)
    r["medicationCodeableConcept"]["coding"] = [{"system": "http://www.whocc.no/atc", "code": "A02BC01"}]
    assert "ppi" in causes(service, atc)
    brand = Patient("m3")
    brand.med_request("Nexium 40 mg capsule", None, start=500, dose=40)
    assert "ppi" in causes(service, brand)


def test_medication_reference_to_bundled_medication(service):
    p = Patient("m4", sex="male", age=70)
    p.med_admin_with_reference("leuprolide acetate 7.5 MG Injection", "42375", 30)       # urn:uuid reference
    assert "androgen_deprivation" in causes(service, p)


def test_invalid_resource_is_skipped_and_counted(service):
    p = Patient("m5")
    p.condition(ICD, "M32.9", "Systemic lupus erythematosus")
    bad = p.condition(ICD, "M06.9", "Rheumatoid arthritis")
    bad["subject"] = {"reference": ["Patient", "m5"]}          # a reference must be a string
    result = run(service, p)
    found = {f.cause.id for f in result.assessment.findings}
    assert "sle" in found and "rheumatoid_arthritis" not in found
    assert result.assessment.record.skipped_invalid == 1


@pytest.mark.parametrize("onset", ["not a date", "2021-02-30", "2021-13-01T10:00:00Z"])
def test_a_malformed_onset_date_does_not_drop_the_condition(service, onset):
    p = Patient("md-onset")
    bad = p.condition(ICD, "M06.9", "Rheumatoid arthritis")
    bad["onsetDateTime"] = onset
    assessment = run(service, p).assessment
    record = assessment.record
    f = {f.cause.id: f for f in assessment.findings}["rheumatoid_arthritis"]
    assert f.evidence[0].text == "Rheumatoid arthritis"      # shown without a date, never a wrong one (codes: --explain)
    assert (record.malformed_dates, record.skipped_invalid) == (1, 0)


def test_a_malformed_birth_date_does_not_make_the_patient_missing(service):
    p = Patient("md-birth", age=70)
    p.med_request("prednisone 10 MG Oral Tablet", "8640", start=200, dose=10)    # fires at any age
    p.entries[0]["resource"]["birthDate"] = "1956-13-45"
    result = run(service, p)
    assert result.assessment.record.has_patient and result.assessment.record.birth_date is None
    assert result.response["cards"] and result.assessment.record.malformed_dates == 1


def test_impossible_values_are_skipped_counted_and_never_shown(service):
    p = Patient("imp1", sex="male", age=60)
    ra(p)
    p.obs("39156-5", "BMI", -1e308, "kg/m2", 20)
    p.obs("98979-8", "eGFR", 5000, "mL/min/{1.73_m2}", 10)
    result = run(service, p)
    assert not {"low_body_weight", "ckd"} & {f.cause.id for f in result.assessment.findings}
    assert result.assessment.record.skipped_implausible == 2
    assert "5000" not in str(result.response) and "e+308" not in str(result.response)


# ---- labs and units ------------------------------------------------------------------------
def test_tsh_units_are_equivalent_and_thyroid_hormone_changes_the_cause(service):
    p = Patient("u1")
    p.obs("3016-3", "TSH", 0.05, "u[IU]/mL", 10)
    assert "hyperthyroidism" in causes(service, p)
    p.med_request("levothyroxine 0.15 MG Oral Tablet", "10582", start=400, dose=0.15)
    found = causes(service, p)
    assert "thyroid_hormone_excess" in found and "hyperthyroidism" not in found


def test_vitamin_d_units(service):
    low_nmol = Patient("u2")
    low_nmol.obs("62292-8", "25-OH D", 45, "nmol/L", 10)               # 18 ng/mL
    assert "vitamin_d_deficiency" in causes(service, low_nmol)
    unknown_unit = Patient("u3")
    unknown_unit.obs("62292-8", "25-OH D", 5, "furlongs", 10)        # never guessed
    assert "vitamin_d_deficiency" not in causes(service, unknown_unit)


def test_latest_result_decides(service):
    p = Patient("u4")
    p.obs("62292-8", "25-OH D", 9, "ng/mL", 200)
    p.obs("62292-8", "25-OH D", 35, "ng/mL", 20)
    assert "vitamin_d_deficiency" not in causes(service, p)


def test_egfr_needs_two_low_results_90_days_apart(service):
    close = Patient("u5")
    for d in (60, 10):
        close.obs("98979-8", "eGFR", 40, "mL/min/{1.73_m2}", d)
    assert "ckd" not in causes(service, close)
    apart = Patient("u6")
    for d in (130, 10):
        apart.obs("98979-8", "eGFR", 40, "mL/min/{1.73_m2}", d)
    assert "ckd" in causes(service, apart)


def test_testosterone_rule_is_for_men_only(service):
    for sex, expected in (("male", True), ("female", False)):
        p = Patient("u7", sex=sex)
        p.obs("2986-8", "Testosterone", 150, "ng/dL", 100)
        p.obs("2986-8", "Testosterone", 160, "ng/dL", 10)
        assert ("hypogonadism" in causes(service, p)) is expected


# ---- time is an input ---------------------------------------------------------------------
def test_the_same_record_evaluated_on_different_days(service):
    p = Patient("t1")
    p.med_request("omeprazole 20 MG Oral Capsule", "7646", start=200, dose=20)      # started AS_OF - 200
    assert "ppi" not in causes(service, p, AS_OF)                                  # 201 days: not yet a year
    assert "ppi" in causes(service, p, AS_OF + timedelta(days=200))               # ongoing: past a year


def test_adults_only(service):
    child = Patient("t2", age=15)
    child.condition(ICD, "M32.9", "Systemic lupus erythematosus")
    result = run(service, child)
    assert result.assessment.findings == [] and result.response == {"cards": []}


# ---- the labelled fixture set --------------------------------------------------------------
@pytest.mark.parametrize("rel", sorted(LABELS["patients"]))
def test_fixture_patient_has_exactly_its_labelled_causes(service, rel):
    result = service.invoke(request_from_bundle(load_fixture(rel)), AS_OF)
    found = {f["cause"] for f in explain(result.assessment)}
    assert found == set(LABELS["patients"][rel]["causes"])


def test_every_cause_has_a_positive_and_a_negative_fixture(catalog):
    files = {rel.split("/")[-1] for rel in LABELS["patients"]}
    for cid in catalog.causes:
        assert any(f.startswith(cid + "-") and "positive" in f for f in files), cid
        assert any(f.startswith(cid + "-") and "negative" in f for f in files), cid


def test_sensitivity_and_specificity_on_the_labelled_set(service, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    from accuracy import evaluate_labelled
    r = evaluate_labelled(service)
    t = r["total"]
    sens, spec = t["tp"] / (t["tp"] + t["fn"]), t["tn"] / (t["tn"] + t["fp"])
    with capsys.disabled():
        print(f"\nlabelled set: {r['patients']} patients, sensitivity {sens:.3f}, specificity {spec:.3f}")
    assert r["patients"] >= 60
    assert sens >= 0.95 and spec >= 0.99


def test_included_medication_after_the_request_that_points_at_it(service):
    """Servers put `_include`d Medications after the matches in a searchset: order must not matter."""
    p = Patient("m6", sex="male", age=70)
    request = request_from_bundle(p.bundle())
    med = {"resourceType": "Medication", "id": "leu",
           "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "42375",
                                "display": "leuprolide"}]}}
    admin = {"resourceType": "MedicationAdministration", "id": "adm1", "status": "completed",
             "subject": {"reference": "Patient/m6"}, "effectiveDateTime": (AS_OF - timedelta(days=30)).isoformat(),
             "medicationReference": {"reference": "Medication/leu"}}
    request["prefetch"]["medicationAdministrations"] = {
        "resourceType": "Bundle", "type": "searchset",
        "entry": [{"resource": admin, "search": {"mode": "match"}}, {"resource": med, "search": {"mode": "include"}}]}
    found = {f.cause.id for f in service.invoke(request, AS_OF).assessment.findings}
    assert "androgen_deprivation" in found


def test_a_resource_under_two_prefetch_keys_counts_once(service):
    """EHRs may answer overlapping prefetch queries (every Observation, and the bone-health ones):
    one low testosterone listed twice is still one result, not the two the rule asks for."""
    p = Patient("dup1", sex="male", age=58)
    p.obs("2986-8", "Testosterone", 180, "ng/dL", 100)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified")
    p.med_request("predniSONE 10 MG Oral Tablet", "8640", start=200, dose=10, supply=90, repeats=3)
    request = request_from_bundle(p.bundle())
    pre = request["prefetch"]
    pre["boneHealthObservations"]["entry"] = list(pre["observations"]["entry"])
    pre["conditions"]["entry"] = pre["conditions"]["entry"] * 2
    pre["medicationStatements"]["entry"] = []
    pre["medicationRequests"]["entry"] = pre["medicationRequests"]["entry"] * 2
    result = service.invoke(request, AS_OF)
    found = {f.cause.id: f for f in result.assessment.findings}
    assert "hypogonadism" not in found
    record = result.assessment.record
    assert len(record.observations["2986-8"]) == 1 and len(record.conditions) == 1 and len(record.medications) == 1
    assert len(found["rheumatoid_arthritis"].evidence) == 1
    assert sum("MedicationRequest/" in e.reference for e in found["glucocorticoids"].evidence[:-1]) == 1

    # a second result on another day does make two
    p.obs("2986-8", "Testosterone", 190, "ng/dL", 30)
    assert "hypogonadism" in causes(service, p)


# ---- validation of what drives a finding --------------------------------------------------------
def test_known_valid_resources_are_not_validated_again(catalog, monkeypatch):
    from cds_service.fhir.record import validation as record_mod
    calls = []
    real = record_mod._model

    def counting(rt):
        model = real(rt)

        class Spy:
            @staticmethod
            def model_validate(res):
                calls.append(res.get("id"))
                return model.model_validate(res)
        return Spy
    monkeypatch.setattr(record_mod, "_model", counting)
    svc = SecondaryOsteoporosis(Toolkit(catalog, FhirClient()))
    p = Patient("v1")
    ra = p.condition(ICD, "M06.9", "Rheumatoid arthritis")
    first = run(svc, p)
    assert first.response["cards"] and ra["id"] in calls and "v1" in calls   # Patient and RA Condition typed
    n = len(calls)
    again = run(svc, p)                                        # the same chart opened again
    assert len(calls) == n
    assert again.response["cards"][0]["summary"] == first.response["cards"][0]["summary"]
    ra["onsetDateTime"] = "2020-02-03"                         # changed content is typed afresh
    run(svc, p)
    assert calls[n:] == [ra["id"]]


def test_invalid_resources_are_never_remembered_as_valid():
    from cds_service.fhir.record import ValidatedResources
    known = ValidatedResources(capacity=2)
    bad = {"resourceType": "Condition", "id": "x", "subject": {"reference": "Patient/p"}, "onsetDateTime": "not a date"}
    assert not known.is_valid(bad) and not known.is_valid(bad) and len(known) == 0
    for i in range(3):
        assert known.is_valid({"resourceType": "Patient", "id": f"p{i}"})
    assert len(known) == 2                                     # bounded: the oldest digest went out


# ---- results older than any rule reads are left out of the record ---------------------------
def _findings_view(result) -> list:
    return [(f.cause.id, f.tier, [(e.reference, e.text) for e in f.evidence + f.supporting])
            for f in result.assessment.findings]


def test_leaving_out_old_results_changes_no_finding_or_card(catalog):
    """Every fixture and synthetic ten-year charts, evaluated at several dates: the same findings,
    evidence and card text with the read windows as when every result is kept."""
    from cds_service.clinical.engine import observation_windows
    from cds_service.fhir.record import RecordBuilder
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic import patient_request
    windowed = SecondaryOsteoporosis(Toolkit(catalog, FhirClient()))
    keep_all = SecondaryOsteoporosis(Toolkit(catalog, FhirClient()))
    keep_all.kit.records = RecordBuilder(catalog)
    assert windowed.kit.records.read_windows == observation_windows(catalog)
    requests = [request_from_bundle(load_fixture(f"patients/{p.name}")) for p in sorted((ROOT / "fixtures/patients").iterdir())]
    requests += [patient_request(400, seed=s) for s in range(1, 6)]
    pruned = 0
    for request in requests:
        for as_of in (AS_OF, AS_OF - timedelta(days=400), AS_OF + timedelta(days=500)):
            a, b = windowed.invoke(request, as_of), keep_all.invoke(request, as_of)
            assert _findings_view(a) == _findings_view(b)
            assert [c["detail"] for c in a.response["cards"]] == [c["detail"] for c in b.response["cards"]]
            pruned += sum(map(len, b.assessment.record.observations.values())) - \
                sum(map(len, a.assessment.record.observations.values()))
    assert pruned > 1000                                       # the windows did leave results out


def test_an_old_former_smoker_status_still_outranks_an_older_tobacco_code(service):
    """The status override reads the newest status of any age: it must survive the read windows."""
    p = Patient("s9")
    p.condition(ICD, "Z72.0", "Tobacco use", onset=3000)
    p.obs("72166-2", "Tobacco smoking status", days_ago=1000, category="social-history",
          value_cc=("8517006", "Ex-smoker (finding)"))
    assert "smoking" not in causes(service, p)
    p2 = Patient("s10")
    p2.condition(ICD, "Z72.0", "Tobacco use", onset=3000)
    assert "smoking" in causes(service, p2)


def test_bmi_from_a_recent_weight_and_a_height_measured_years_ago(service):
    p = Patient("w9", age=70)
    p.obs("29463-7", "Body weight", 45, "kg", 30, category="vital-signs")
    p.obs("8302-2", "Body height", 165, "cm", 2500, category="vital-signs")      # adult height: any age
    f = causes(service, p)["low_body_weight"]
    assert any("BMI 16.5" in e.text for e in f.evidence)


def test_read_windows_cover_every_code_the_rules_read(catalog):
    from cds_service.clinical.engine import observation_windows
    windows = observation_windows(catalog)
    for rule in catalog.observation_rules.values():
        for key in ("loinc", "calcium_loinc", "pth_loinc", "albumin_loinc", "weight_loinc", "height_loinc",
                    "skip_if_any_loinc"):
            for code in rule.get(key, ()):
                assert code in windows
                assert windows[code] is None or windows[code] >= rule.get("lookback_days", 365)
    assert windows["8302-2"] is None and windows["72166-2"] is None    # height, smoking status: any age


# ---- real-world coding (issue 10): codes as Synthea and EHRs record them -----------------------------
SCT = "http://snomed.info/sct"


@pytest.mark.parametrize("code, display, cause", [
    ("87433001", "Pulmonary emphysema (disorder)", "copd"),
    ("185086009", "Chronic obstructive bronchitis (disorder)", "copd"),
    ("7200002", "Alcoholism (disorder)", "alcohol"),
    ("433144002", "Chronic kidney disease stage 3 (disorder)", "ckd"),
    ("161665007", "History of renal transplant (situation)", "organ_transplant"),
    ("698754002", "Chronic paralysis due to lesion of spinal cord (disorder)", "immobility"),
    ("19943007", "Cirrhosis of liver (disorder)", "chronic_liver_disease"),          # VSAC Chronic Liver Disease
    ("128302006", "Chronic hepatitis C (disorder)", "chronic_liver_disease"),
    ("69896004", "Rheumatoid arthritis (disorder)", "rheumatoid_arthritis"),
])
def test_snomed_concepts_more_specific_than_the_catalog_match(service, code, display, cause):
    p = Patient("sct-" + code, sex="male", age=66)
    p.condition(SCT, code, display, onset=800)
    assert cause in causes(service, p)


def test_type_2_diabetes_recorded_only_by_a_complication(service):
    p = Patient("t2c", sex="male", age=70)
    p.condition(SCT, "90781000119102", "Microalbuminuria due to type 2 diabetes mellitus (disorder)", onset=900)
    assert "diabetes_type2" in causes(service, p)


def test_mdrd_egfr_with_a_normal_day_between_is_not_chronic(service):
    """33914-3 (MDRD, the most common eGFR code) is read; a normal day between two lows breaks the run."""
    broken = Patient("md1", sex="male", age=70)
    for value, d in ((45, 300), (75, 150), (44, 10)):
        broken.obs("33914-3", "eGFR (MDRD)", value, "mL/min/{1.73_m2}", d)
    assert "ckd" not in causes(service, broken)
    run = Patient("md2", sex="male", age=70)
    for value, d in ((45, 300), (52, 150), (44, 10)):
        run.obs("33914-3", "eGFR (MDRD)", value, "mL/min/{1.73_m2}", d)
    f = causes(service, run)["ckd"]
    assert [e.text.split(" on ")[-1] for e in f.evidence] == [(AS_OF - timedelta(days=300)).isoformat(),
                                                             (AS_OF - timedelta(days=10)).isoformat()]


def test_low_egfr_contradicted_by_the_same_days_creatinine_is_not_read(service):
    """Synthea writes eGFR and creatinine independently; a laboratory computes one from the other."""
    p = Patient("cr1", sex="male", age=55)
    for d in (200, 20):
        p.obs("33914-3", "eGFR (MDRD)", 40, "mL/min/{1.73_m2}", d)
        p.obs("2160-0", "Creatinine", 0.9, "mg/dL", d)          # CKD-EPI 2021: about 100
    assert "ckd" not in causes(service, p)
    agrees = Patient("cr2", sex="male", age=55)
    for d in (200, 20):
        agrees.obs("33914-3", "eGFR (MDRD)", 40, "mL/min/{1.73_m2}", d)
        agrees.obs("38483-4", "Creatinine [Mass/volume] in Blood", 1.9, "mg/dL", d)   # about 41
    assert "ckd" in causes(service, agrees)


def test_ckd_code_before_a_run_of_normal_egfr_is_out_of_date(service):
    """After a kidney transplant, CKD stage 4 entries are often never abated."""
    p = Patient("tx1", sex="male", age=60)
    p.condition(SCT, "431857002", "Chronic kidney disease stage 4 (disorder)", onset=2000)
    for d in (400, 200, 30):
        p.obs("33914-3", "eGFR (MDRD)", 85, "mL/min/{1.73_m2}", d)
    assert "ckd" not in causes(service, p)
    still = Patient("tx2", sex="male", age=60)
    still.condition(SCT, "431857002", "Chronic kidney disease stage 4 (disorder)", onset=2000)
    assert "ckd" in causes(service, still)             # no eGFR on file: the code stands


def test_implausible_values_and_decimal_strings(service):
    bad = Patient("iv1", sex="male", age=60)
    for d in (200, 20):
        bad.obs("98979-8", "eGFR", 5000, "mL/min/{1.73_m2}", d)
    assert "ckd" not in causes(service, bad)
    low_bmi = Patient("iv2", sex="female", age=60)
    low_bmi.obs("39156-5", "BMI", -1e308, "kg/m2", 20)
    assert "low_body_weight" not in causes(service, low_bmi)
    text = Patient("iv3", sex="male", age=60)
    for d in (200, 20):
        text.obs("98979-8", "eGFR", 40, "mL/min/{1.73_m2}", d)
    for e in text.entries:
        if e["resource"]["resourceType"] == "Observation":
            e["resource"]["valueQuantity"]["value"] = "40"   # a decimal sent as a JSON string (carebundle output)
    assert "ckd" in causes(service, text)


def test_dmpa_is_current_within_six_months_of_an_injection_or_while_an_order_is_active(service):
    given = Patient("dm1", age=30)
    given.med_admin_with_reference("1 ML medroxyprogesterone acetate 150 MG/ML Injection", "1000126", days_ago=100)
    assert "dmpa" in causes(service, given)
    past = Patient("dm2", age=30)
    past.med_admin_with_reference("1 ML medroxyprogesterone acetate 150 MG/ML Injection", "1000126", days_ago=270)
    assert "dmpa" not in causes(service, past)
    stopped = Patient("dm3", age=30)              # a stopped order still shows the dose was given
    stopped.med_request("1 ML medroxyprogesterone acetate 150 MG/ML Injection", "1000126", status="stopped", start=60)
    assert "dmpa" in causes(service, stopped)
    old_active = Patient("dm4", age=30)
    old_active.med_request("1 ML medroxyprogesterone acetate 150 MG/ML Injection", "1000126", start=400)
    assert "dmpa" in causes(service, old_active)


def test_the_more_specific_cause_is_listed_alone(service):
    p = Patient("ov1", age=60)
    p.condition(ICD, "K90.0", "Celiac disease")               # K90.0 is also under K90 malabsorption
    p.condition(ICD, "C90.00", "Multiple myeloma not having achieved remission")
    p.condition(ICD, "D47.2", "Monoclonal gammopathy")
    found = causes(service, p)
    assert {"celiac", "multiple_myeloma"} <= set(found) and not {"malabsorption", "mgus"} & set(found)


def test_latest_smoking_status_is_read_back_years(service):
    p = Patient("sm1", sex="male", age=40)
    p.obs("72166-2", "Tobacco smoking status", value_cc=("449868002", "Smokes tobacco daily (finding)"), days_ago=900)
    assert "smoking" in causes(service, p)


def test_value_set_products_are_read_by_their_whole_ingredient_name(service, catalog):
    """Methylprednisolone is 1.25x prednisone, not prednisolone's 1x; fludrocortisone is no glucocorticoid."""
    rx = "http://www.nlm.nih.gov/research/umls/rxnorm"
    by_display = {c["display"]: c["code"] for c in catalog.value_sets["2.16.840.1.113883.3.464.1003.196.12.1266"]["codes"]}
    methyl = catalog.ingredients_for_coding(rx, by_display["methylprednisolone 16 MG Oral Tablet"])
    assert [(i.name, i.prednisone_equivalent_factor) for i in methyl] == [("methylprednisolone", 1.25)]
    assert catalog.ingredients_for_coding(rx, by_display["fludrocortisone acetate 0.1 MG Oral Tablet"]) == []
    p = Patient("mp1", sex="male", age=60)          # coded by SCD only, as EHRs send it
    p.med_request("methylprednisolone 16 MG Oral Tablet", by_display["methylprednisolone 16 MG Oral Tablet"],
                  start=150, dose=16, dose_unit="mg")
    f = causes(service, p)["glucocorticoids"]
    assert any("= 20 mg/day prednisone-equivalent" in e.text for e in f.evidence)
    fludro = Patient("fl1", sex="male", age=60)
    fludro.med_request("fludrocortisone acetate 0.1 MG Oral Tablet", by_display["fludrocortisone acetate 0.1 MG Oral Tablet"],
                       start=500, dose=1)
    assert "glucocorticoids" not in causes(service, fludro)


@pytest.mark.parametrize("system", ["http://hl7.org/fhir/sid/icd-9-cm", "urn:oid:2.16.840.1.113883.6.103",
                                    "http://terminology.hl7.org/CodeSystem/icd9cm"])
def test_icd9_cm_is_read_in_every_spelling_ehrs_send(service, system):
    p = Patient("icd9", age=60)
    p.condition(system, "242.00", "Toxic diffuse goiter without mention of thyrotoxic crisis or storm")
    assert "hyperthyroidism" in causes(service, p)


def test_the_newest_copy_of_a_re_recorded_condition_decides(service):
    """Synthea and many EHRs re-record a condition at each visit; when the newest copy is resolved
    (here, CKD after a kidney transplant), the older copies left active are stale."""
    p = Patient("rc1", sex="male", age=64)
    p.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", onset=3000)
    p.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", clinical="resolved", onset=2000, abated=400)
    result = run(service, p)
    assert "ckd" not in {f.cause.id for f in result.assessment.findings}
    assert result.assessment.record.superseded == 1
    relapsed = Patient("rc2", sex="male", age=64)       # active again after the resolved copy: it stands
    relapsed.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", clinical="resolved", onset=2000, abated=400)
    relapsed.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", onset=300)
    assert "ckd" in causes(service, relapsed)
    in_error = Patient("rc3", sex="male", age=64)       # an entered-in-error copy says nothing about the patient
    in_error.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", onset=3000)
    in_error.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", verification="entered-in-error",
                       onset=100)
    assert "ckd" in causes(service, in_error)
    refuted = Patient("rc4", sex="male", age=64)
    refuted.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", onset=3000)
    refuted.condition(SCT, "433144002", "Chronic kidney disease stage 3 (disorder)", verification="refuted", onset=100)
    assert "ckd" not in causes(service, refuted)


def test_a_healed_fracture_stays_on_record_as_bone_history(service):
    """Synthea records a hip fracture `resolved` once healed; it is still a fragility fracture on record."""
    p = Patient("fx1", age=71)
    ra(p)
    p.condition(SCT, "359817006", "Closed fracture of hip (disorder)", clinical="resolved", onset=700, abated=600)
    ctx = run(service, p).assessment.context
    assert [e.text for e in ctx.bone_diagnoses] == [
        f"Closed fracture of hip (disorder), onset {(AS_OF - timedelta(days=700)).isoformat()}, "
        "recorded as resolved (history)"]
    wrong = Patient("fx2", age=71)
    ra(wrong)
    wrong.condition(SCT, "359817006", "Closed fracture of hip (disorder)", verification="entered-in-error", onset=700)
    assert run(service, wrong).assessment.context.bone_diagnoses == []


def test_procedures_that_are_evidence_only_while_recent(service):
    """Dialysis stops after a kidney transplant; chemotherapy decades ago is past cancer treatment."""
    past = Patient("ea1", sex="male", age=58)
    for d in (500, 480, 460):
        past.procedure(SCT, "265764009", "Renal dialysis (procedure)", days_ago=d)
    assert "ckd" not in causes(service, past)
    current = Patient("ea2", sex="male", age=58)
    for d in (60, 30, 10):
        current.procedure(SCT, "265764009", "Renal dialysis (procedure)", days_ago=d)
    f = causes(service, current)["ckd"]
    assert len(f.evidence) == 1 and len(f.references) == 3            # one line for the three sessions
    assert f.evidence[0].text.endswith(f"; recorded 3 times, last {(AS_OF - timedelta(days=10)).isoformat()}")
    childhood = Patient("ea3", sex="male", age=47)
    childhood.procedure(SCT, "367336001", "Chemotherapy (procedure)", days_ago=12000)
    assert "chemotherapy_ovarian_suppression" not in causes(service, childhood)
    recent = Patient("ea4", sex="female", age=47)
    recent.procedure(SCT, "367336001", "Chemotherapy (procedure)", days_ago=100)
    assert "chemotherapy_ovarian_suppression" in causes(service, recent)


def test_planned_refills_are_not_past_use(service):
    """An order written 20 days ago with 12 refills is 20 days of use so far, not 390."""
    ppi = Patient("mt1", sex="male", age=66)
    ppi.med_request("omeprazole 20 MG Delayed Release Oral Capsule", "7646", start=20, dose=20, supply=30, repeats=12)
    assert "ppi" not in causes(service, ppi)
    gc = Patient("mt2", sex="male", age=66)               # ACR 2022 counts a planned course: the card says which is which
    gc.med_request("prednisone 10 MG Oral Tablet", "8640", start=20, dose=10, supply=30, repeats=12)
    f = causes(service, gc)["glucocorticoids"]
    assert any(e.text.startswith("21 days so far at >= 2.5 mg/day prednisone-equivalent (") for e in f.evidence)


def test_a_single_dose_injection_left_active_is_not_daily_use(service):
    """Synthea leaves injection orders `active` for years with no dosage: one dose is not a daily course."""
    pulse = Patient("sd1", sex="male", age=66)
    pulse.med_request("methylprednisolone 1000 MG Injection", "6902", start=700)
    assert "glucocorticoids" not in causes(service, pulse)
    flush_free = Patient("sd2", sex="male", age=66)
    flush_free.med_request("enoxaparin sodium 40 MG/0.4ML Prefilled Syringe", "67108", start=300)
    result = run(service, flush_free)
    assert "heparin" not in {f.cause.id for f in result.assessment.findings}
    exposure = result.assessment.record.medications[0]
    assert exposure.single_dose and exposure.end == exposure.start
    assert exposure.describe().endswith(f"single dose on {(AS_OF - timedelta(days=300)).isoformat()} (order still active)")
    daily = Patient("sd3", sex="male", age=66)             # the same syringe ordered daily for months is long-term heparin
    daily.med_request("enoxaparin sodium 40 MG/0.4ML Prefilled Syringe", "67108", start=150, text="40 mg subcutaneously daily")
    assert "heparin" in causes(service, daily)


def test_weekly_and_monthly_regimens_are_shown_as_such(service):
    p = Patient("wk1", age=70)
    ra(p)
    p.med_request("alendronic acid 70 MG Oral Tablet", None, start=200, text="Take 1 tablet by mouth once a week")
    treatments = [e.text for e in run(service, p).assessment.context.treatments]
    assert any(t.startswith("alendronic acid 70 MG Oral Tablet, 70 mg weekly, ") for t in treatments), treatments
    p = Patient("wk2", age=70)
    ra(p)
    p.med_request("ibandronate 150 MG Oral Tablet", "115264", start=200, text="150 mg by mouth monthly")
    treatments = [e.text for e in run(service, p).assessment.context.treatments]
    assert any(t.startswith("ibandronate 150 MG Oral Tablet, 150 mg monthly, ") for t in treatments), treatments


def test_a_months_long_inpatient_heparin_course_counts(service):
    """Each inpatient administration is a day of use; the 90-day threshold keeps short courses out."""
    long_stay = Patient("ih1", sex="male", age=75)
    for d in range(130, 10, -1):
        long_stay.med_admin_with_reference("heparin sodium 5000 UNT/ML Injectable Solution", "5224", days_ago=d)
    f = causes(service, long_stay)["heparin"]
    assert any(e.text.startswith("120 days of use in the last 365 days") for e in f.evidence)
    short_stay = Patient("ih2", sex="male", age=75)
    for d in range(40, 33, -1):
        short_stay.med_admin_with_reference("heparin sodium 5000 UNT/ML Injectable Solution", "5224", days_ago=d)
    assert "heparin" not in causes(service, short_stay)


def test_a_treatment_is_not_the_disease(service):
    """Radio-iodine ablation is in the VSAC Hyperthyroidism value set; afterwards the patient is usually hypothyroid."""
    ablated = Patient("rai1", age=58)
    ablated.procedure(SCT, "431588009", "Radionuclide iodine 131 therapy for thyrotoxicosis (procedure)", days_ago=900)
    assert "hyperthyroidism" not in causes(service, ablated)
    active = Patient("rai2", age=58)
    active.condition(ICD, "E05.00", "Thyrotoxicosis with diffuse goiter without thyrotoxic crisis or storm", onset=300)
    active.procedure(SCT, "431588009", "Radionuclide iodine 131 therapy for thyrotoxicosis (procedure)", days_ago=30)
    f = causes(service, active)["hyperthyroidism"]
    assert len(f.evidence) == 1 and f.supporting[0].text.startswith("Radionuclide iodine 131 therapy")


def test_high_calcium_with_an_inappropriately_normal_pth_is_the_primary_pattern(service):
    p = Patient("ph1", age=63)
    p.obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 11.2, "mg/dL", 20, low=8.6, high=10.3)
    p.obs("2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", 48, "pg/mL", 20, low=15, high=65)
    f = causes(service, p)["hyperparathyroidism"]
    assert f.evidence[1].text.endswith("(within the normal range but not suppressed by the high calcium: inappropriately normal)")
    suppressed = Patient("ph2", age=63)           # PTH-independent hypercalcaemia (e.g. malignancy) suppresses PTH
    suppressed.obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 11.2, "mg/dL", 20, low=8.6, high=10.3)
    suppressed.obs("2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", 9, "pg/mL", 20, low=15, high=65)
    assert "hyperparathyroidism" not in causes(service, suppressed)


def test_a_failed_dexamethasone_suppression_test_supports_cushings(service):
    failed = Patient("dst1", age=52)
    failed.med_admin_with_reference("dexamethasone 1 MG Oral Tablet", "3264", days_ago=31, dose_mg=1)
    failed.obs("2143-6", "Cortisol [Mass/volume] in Serum or Plasma", 4.2, "ug/dL", 30)
    f = causes(service, failed)["cushings"]
    assert f.evidence[0].text == (f"Cortisol 4.2 ug/dL on {(AS_OF - timedelta(days=30)).isoformat()} after dexamethasone 1 mg "
                                  f"on {(AS_OF - timedelta(days=31)).isoformat()}: not suppressed (above 1.8)")
    named = Patient("dst2", age=52)               # named as the test; 138 nmol/L is 5 ug/dL
    named.obs("2143-6", "Cortisol post 1 mg dexamethasone suppression", 138, "nmol/L", 30)
    assert "cushings" in causes(service, named)
    suppressed = Patient("dst3", age=52)
    suppressed.med_admin_with_reference("dexamethasone 1 MG Oral Tablet", "3264", days_ago=31, dose_mg=1)
    suppressed.obs("2143-6", "Cortisol [Mass/volume] in Serum or Plasma", 1.1, "ug/dL", 30)
    assert "cushings" not in causes(service, suppressed)
    morning = Patient("dst4", age=52)             # a random morning cortisol is not a suppression test
    morning.obs("2143-6", "Cortisol [Mass/volume] in Serum or Plasma", 18, "ug/dL", 30)
    assert "cushings" not in causes(service, morning)


def _text_condition(p: Patient, text: str, coding: list | None = None) -> dict:
    """A problem-list entry as free-text EHRs send it: text, and at most a local code."""
    r = {"resourceType": "Condition", "subject": p.subject, "code": {"text": text}, "onsetDateTime": "2023-05-02",
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                        "code": "active"}]}}
    if coding:
        r["code"]["coding"] = coding
    return p.add(r)


@pytest.mark.parametrize("text, cause", [
    ("Rheumatoid arthritis", "rheumatoid_arthritis"),
    ("Crohn\u2019s disease of ileum", "ibd"),
    ("CKD stage 3b", "ckd"),
    ("Type 2 diabetes, no complications", "diabetes_type2"),   # "no" after the name does not negate it
    ("COPD - on home oxygen", "copd"),
])
def test_a_condition_recorded_as_text_only_is_read(service, text, cause):
    p = Patient("tx-" + cause, age=66)
    _text_condition(p, text, [{"system": "urn:oid:1.2.840.114350.1.13.0.1.7.2.696580", "code": "40217"}])  # a local code
    f = causes(service, p)[cause]
    assert f.evidence[0].text == f"{text} (recorded as text, no code we know), onset 2023-05-02"


@pytest.mark.parametrize("text", [
    "No celiac disease", "Denies alcohol abuse", "FH: rheumatoid arthritis", "Rheumatoid arthritis (mother)",
    "?Cushing's syndrome", "Possible COPD", "Rule out multiple myeloma", "Graves disease - resolved",
    "Ulcerative colitis in remission", "History of ischemic stroke", "Cystic fibrosis carrier", "Exposure to HIV infection", "Screening for HIV infection", "Hearing aids",
])
def test_negated_uncertain_past_or_family_text_is_not_a_diagnosis(service, text):
    p = Patient("txn", age=66)
    _text_condition(p, text)
    assert causes(service, p) == {}


def test_text_is_read_only_when_no_coding_is_known(service):
    """A coded entry the catalog maps is read by its code; text never adds a second cause to it."""
    p = Patient("txc", age=66)
    _text_condition(p, "Rheumatoid arthritis with celiac disease",
                    [{"system": ICD, "code": "M06.9", "display": "Rheumatoid arthritis, unspecified"}])
    assert set(causes(service, p)) == {"rheumatoid_arthritis"}


def test_a_very_high_dose_course_counts_before_three_months(service):
    """ACR 2022 very high risk: prednisone >= 30 mg/day for more than 30 days, even if it has not run 3 months."""
    p = Patient("vh1", sex="female", age=47)
    p.med_request("prednisone 20 MG Oral Tablet", "8640", start=60, dose=40)
    f = causes(service, p)["glucocorticoids"]
    assert f.tier == "very_high"
    short = Patient("vh2", sex="female", age=47)        # three weeks at 40 mg: a burst
    short.med_request("prednisone 20 MG Oral Tablet", "8640", status="completed", start=60, dose=40, supply=21)
    assert "glucocorticoids" not in causes(service, short)
