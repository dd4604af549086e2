"""The card: one per invocation, CDS Hooks 2.0-valid, evidence-bearing, workup in one click."""
from __future__ import annotations

from html.parser import HTMLParser

import re
import uuid
from datetime import timedelta

import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest

from cds_service.fhir.bundles import request_from_bundle
from cds_service.fhir.fhir_client import FhirClient
from cds_service.services import SecondaryOsteoporosis, Toolkit

from .conftest import AS_OF, LABELS, ROOT, load_fixture, walk_empty

import sys
sys.path.insert(0, str(ROOT))
from fixtures.generate import ICD, SPECS, Patient  # noqa: E402

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def service(catalog):
    return SecondaryOsteoporosis(Toolkit(catalog, FhirClient()))


@pytest.fixture(scope="module")
def standard():
    """The standard firing policy (every cause with policy.fires_alone fires): a site may choose it."""
    from cds_service.knowledge.catalog import load_catalog
    cat = load_catalog()
    cat.settings["firing_policy"] = "standard"
    return SecondaryOsteoporosis(Toolkit(cat, FhirClient()))


def response_for(service, bundle: dict) -> tuple[dict, object]:
    result = service.invoke(request_from_bundle(bundle), AS_OF)
    return result.response, result.assessment


ALL_RESPONSES = sorted(LABELS["patients"])


@pytest.mark.parametrize("rel", ALL_RESPONSES)
def test_every_fixture_response_is_valid_cds_hooks(standard, rel):
    """Under the standard firing policy every positive fixture gets its card: each card is CDS Hooks-valid (the quiet
    default's choices are tested on their own below)."""
    service = standard
    body, assessment = response_for(service, load_fixture(rel))
    assert set(body) == {"cards"} and len(body["cards"]) <= 1          # one card, no alert storm
    expected_card = any(service.catalog.causes[c].fires_alone for c in LABELS["patients"][rel]["causes"])
    assert bool(body["cards"]) is expected_card
    assert walk_empty(body["cards"]) == [] if body["cards"] else body == {"cards": []}
    for card in body["cards"]:
        assert len(card["summary"]) < 140
        assert card["indicator"] in ("info", "warning", "critical")
        assert UUID_RE.match(card["uuid"])
        assert card["source"]["label"]
        assert "<" not in card["detail"].replace("\\<", "")                 # no raw HTML
        assert card["selectionBehavior"] == "any"
        for s in card["suggestions"]:
            assert s["label"] and UUID_RE.match(s["uuid"]) and s["actions"]
            for a in s["actions"]:
                assert a["type"] == "create" and a["description"]
                ServiceRequest.model_validate(a["resource"])                 # standard R4 JSON
                assert a["resource"]["subject"]["reference"] == f"Patient/{assessment.patient_id}"
        for r in card["overrideReasons"]:
            assert r["code"] and r["system"] and r["display"]
        for link in card.get("links", []):
            assert link["type"] == "absolute" and link["url"].startswith("https://") and "appContext" not in link


def _indicators(service) -> tuple[str, str]:
    """The indicator of an RA-only (strong cause) and a COPD-only (moderate cause) card."""
    ra, copd = Patient("ind-ra"), Patient("ind-copd")
    ra.condition(ICD, "M06.9", "Rheumatoid arthritis")
    copd.condition(ICD, "J44.9", "COPD")
    return tuple(response_for(service, p.bundle())[0]["cards"][0]["indicator"] for p in (ra, copd))


def test_the_card_is_info_unless_the_quiet_indicator_policy_names_a_warning(service):
    """scope.indicator_policy: quiet (the default): a strong cause alone (RA) is `info`; long-term
    glucocorticoids with no DXA in 2 years and the primary hyperparathyroidism pattern are `warning`,
    glucocorticoids with a recent DXA are not."""
    assert _indicators(service) == ("info", "info")
    for rel in ("patients/glucocorticoids-positive.json", "patients/hyperparathyroidism-positive.json"):
        assert response_for(service, load_fixture(rel))[0]["cards"][0]["indicator"] == "warning", rel
    gc_with_dxa = Patient("ind3")
    gc_with_dxa.med_request("predniSONE 5 MG Oral Tablet", "312617", start=180, dose=2, dose_unit="{tbl}",
                            text="Take 2 tablets by mouth daily")
    gc_with_dxa.procedure("http://www.ama-assn.org/go/cpt", "77080", "DXA bone density study, axial skeleton", 200)
    assert response_for(service, gc_with_dxa.bundle())[0]["cards"][0]["indicator"] == "info"


def test_the_standard_indicator_policy_warns_for_any_strong_cause():
    from cds_service.knowledge.catalog import load_catalog
    cat = load_catalog()
    cat.settings["indicator_policy"] = "standard"
    cat.settings["firing_policy"] = "standard"          # (the quiet firing policy implies the quiet indicator)
    assert _indicators(SecondaryOsteoporosis(Toolkit(cat, FhirClient()))) == ("warning", "info")


def test_detail_shows_evidence_with_date_value_and_guideline_never_ids(service):
    body, _ = response_for(service, load_fixture("patients/hyperparathyroidism-positive.json"))
    detail = body["cards"][0]["detail"]
    assert "Calcium 11.2 mg/dL on 2026-06-10" in detail and "albumin-corrected" in detail
    assert "PTH 128 pg/mL" in detail
    assert "Observation/" not in detail and "urn:uuid" not in detail     # words and dates; ids stay in --explain
    assert "Guideline: Fifth International Workshop on Primary Hyperparathyroidism 2022" in detail


def test_summary_stays_under_140_with_every_cause_at_once(service):
    p = Patient("many", sex="male", age=60)
    for name, sex, age, fn, expected in SPECS:
        # (a bone drug on record would lead with its own safety line, and lactation with its own advice)
        if name.endswith("-positive") and not any(x in name for x in ("thyroid_hormone_excess", "already-treated",
                                                                       "pregnancy_lactation")):
            fn(p)
    body, assessment = response_for(service, p.bundle())
    assert len(assessment.findings) > 40
    summary = body["cards"][0]["summary"]
    assert len(summary) < 140 and re.search(r"\+\d+ more", summary)


def test_listed_only_causes_appear_under_also_noted(service):
    body, _ = response_for(service, load_fixture("patients/ssri-positive.json"))
    detail = body["cards"][0]["detail"]
    assert "Also noted" in detail and "Selective serotonin reuptake inhibitors" in detail
    assert "SSRI" not in body["cards"][0]["summary"]


def test_one_click_per_test_and_dxa_when_none_recent(service):
    """Issue 19: one suggestion per test (one click each), not one bundle; recommended only where a guideline says so
    for this patient; no DXA in active myeloma (skeletal survey or low-dose CT image its bone disease)."""
    body, _ = response_for(service, load_fixture("patients/multiple_myeloma-positive.json"))
    suggestions = body["cards"][0]["suggestions"]
    assert [s["label"] for s in suggestions[:3]] == [
        "Order CBC", "Order Comprehensive metabolic panel (calcium, albumin, creatinine/eGFR, ALP)", "Order 25-OH vitamin D"]
    assert all(len(s["actions"]) == 1 for s in suggestions[:3])
    assert not any(s["isRecommended"] for s in suggestions[:3])       # no low bone density or fracture on record
    spep = next(s for s in suggestions if "SPEP" in s["label"] or "electrophoresis" in s["label"].lower())
    assert {a["resource"]["code"]["coding"][0]["code"] for a in spep["actions"]} == {"24351-9", "36916-5", "33944-0", "48378-4"}
    assert spep["isRecommended"] is True                              # the firing cause's own test
    assert not any("DXA" in s["label"] for s in suggestions)
    assert "active myeloma" in body["cards"][0]["detail"]
    ra = Patient("dxa-ra", age=66)
    ra.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified")
    body, _ = response_for(service, ra.bundle())
    dxa = next(s for s in body["cards"][0]["suggestions"] if "DXA" in s["label"])
    coding = dxa["actions"][0]["resource"]["code"]["coding"][0]
    assert (coding["system"], coding["code"]) == ("http://www.ama-assn.org/go/cpt", "77080") and dxa["isRecommended"]


def test_testosterone_is_not_offered_to_women(service):
    body, _ = response_for(service, load_fixture("patients/rheumatoid_arthritis-positive.json"))
    codes = {a["resource"]["code"]["coding"][0]["code"] for s in body["cards"][0]["suggestions"] for a in s["actions"]}
    assert "2986-8" not in codes


def test_context_shapes_the_card_recent_dxa_treatment_and_done_labs(service):
    body, _ = response_for(service, load_fixture("patients/already-treated-glucocorticoids-positive.json"))
    card = body["cards"][0]
    labels = " | ".join(s["label"] for s in card["suggestions"])
    assert "DXA" not in labels                                     # DXA 200 days ago: not re-offered
    assert "Already on osteoporosis therapy: alendronate" in card["detail"]
    assert "Age-related osteoporosis" in card["detail"]
    ordered = {a["resource"]["code"]["coding"][0]["code"] for s in card["suggestions"] for a in s["actions"]}
    assert not ({"62292-8", "3016-3", "2731-8"} & ordered)         # resulted 90 days ago
    assert "Already resulted in the last 365 days" in card["detail"]


def test_glucocorticoid_patient_gets_dxa_with_vfa(service):
    body, _ = response_for(service, load_fixture("patients/glucocorticoids-positive.json"))
    dxa = next(s for s in body["cards"][0]["suggestions"] if "DXA" in s["label"])
    assert dxa["actions"][0]["resource"]["code"]["coding"][0]["code"] == "77085"


def test_card_and_suggestion_uuids_are_unique_across_invocations(service):
    bundle = load_fixture("patients/celiac-positive.json")
    ids = []
    for _ in range(3):
        card = response_for(service, bundle)[0]["cards"][0]
        ids += [card["uuid"]] + [s["uuid"] for s in card["suggestions"]]
    assert len(ids) == len(set(ids))
    assert all(uuid.UUID(i).version == 4 for i in ids)


INJECTIONS = [
    "[click](http://evil.example/a) http://evil.example/b www.evil.example user@evil.example",
    "<script>alert(1)</script> <img src=x onerror=alert(1)> **bold** _it_ `code` ~~gone~~",
    "see https://evil.example/x\\) and (http://evil.example/y) <http://evil.example/z> mailto:a@b.example",
    "Tom &amp; Jerry &copy; &#64; [ref][1] ![img](http://evil.example/i.png) | a | b | # heading > quote",
    "WWW.EVIL.EXAMPLE/path?q=1&r=2 ftp://files.example/x xmpp:foo@bar.example a`b`c@d.example ``x``",
    "1. not a list - or this + nor this \\ backslash",
    # issue 21: what linkify still linked, and invisible characters
    "evil.example bare and EVIL.COM/login?x=1 and sub.evil.co.uk:8080/p",
    "//evil.example/x protocol-relative and \\\\evil.example\\share",
    "w\u200bww.evil.example and ev\u200cil.example hidden by zero-width characters",
    "\u202eevil.example\u202c reversed and \ufeffbom.example",
]


_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


class _Text(HTMLParser):
    """The text a browser shows for rendered HTML, and every element used."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)

    def handle_data(self, data):
        self.text.append(data)


def _shown(html: str) -> tuple[str, set[str]]:
    parser = _Text()
    parser.feed(html)
    return " ".join("".join(parser.text).split()), parser.tags


@pytest.mark.parametrize("text", INJECTIONS)
def test_chart_text_shows_as_recorded_and_never_becomes_a_link(text):
    """GitHub's cmark-gfm (autolinks on) and markdown-it with linkify: the words as recorded, as text or
    code, no link, no HTML of the chart's own."""
    import cmarkgfm
    from markdown_it import MarkdownIt

    from cds_service.rendering.cards import md
    for render in (cmarkgfm.github_flavored_markdown_to_html,
                   MarkdownIt("commonmark", {"linkify": True}).enable(["linkify", "strikethrough", "table"]).render):
        shown, tags = _shown(render(md(text)))
        assert shown == " ".join(_INVISIBLE.sub("", text).split()), render        # as recorded, controls removed
        assert tags <= {"p", "code"}, (tags, render)


def test_a_very_long_word_is_broken_and_invisible_controls_removed():
    from cds_service.rendering.cards import LONGEST_WORD, md
    out = md("x" * 20_000 + " \u202eevil")
    assert max(len(w) for w in out.split(" ")) <= LONGEST_WORD and "\u202e" not in out


def test_chart_text_cannot_inject_markdown_or_html(service):
    p = Patient("inj")
    p.condition(ICD, "M32.9", "<script>alert(1)</script> [click](https://evil.example) **bold**")
    detail = response_for(service, p.bundle())[0]["cards"][0]["detail"]
    assert "<script>" not in detail and "[click](https://evil.example)" not in detail.replace("`[click](https", "")


# ---- treatment gap, kidney safety, treated patients (issue 11) ---------------------------------
SCT = "http://snomed.info/sct"


def _healed_hip_fracture(p: Patient, days_ago: int = 700) -> None:
    p.condition(SCT, "359817006", "Closed fracture of hip (disorder)", clinical="resolved", onset=days_ago,
                abated=days_ago - 60)


def test_untreated_osteoporosis_leads_the_card_even_with_no_cause(service):
    """Bone -> cause: a healed hip fracture at 78 with no therapy is the classic indication."""
    p = Patient("gap1", age=78)
    _healed_hip_fracture(p)
    body, a = response_for(service, p.bundle())
    card = body["cards"][0]
    assert a.findings == [] and a.context.treatment_gap
    assert card["indicator"] == "warning"
    assert card["summary"] == "Untreated fragility fracture: consider osteoporosis therapy."
    assert card["detail"].startswith("**Treatment gap: fragility fracture on record and no current osteoporosis medicine**")
    assert "bisphosphonate first line" in card["detail"]
    labels = [s["label"] for s in card["suggestions"]]
    assert {"Order CBC", "Order PTH, intact", "Order DXA bone density scan"} <= set(labels)
    assert all(s["isRecommended"] for s in card["suggestions"])      # the workup of osteoporosis (AACE 2020)


def test_the_gap_summary_names_the_causes_that_follow(service):
    p = Patient("gap2", age=70)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=400)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=2000)
    body, _ = response_for(service, p.bundle())
    assert body["cards"][0]["summary"] == ("Untreated osteoporosis: consider osteoporosis therapy. "
                                           "Possible secondary causes: rheumatoid arthritis.")


def test_a_low_t_score_is_osteoporosis_and_a_childhood_fracture_is_not_fragility(service):
    low = Patient("gap3", age=66)
    low.obs("38267-1", "DXA Lumbar spine [T-score] Bone density", -2.8, "{T-score}", 900)
    _, a = response_for(service, low.bundle())
    assert a.context.treatment_gap and a.context.low_t_score.text.startswith("T-score -2.8 (DXA Lumbar spine)")
    young = Patient("gap4", age=40)          # a forearm fracture at 12 is trauma
    young.condition(SCT, "65966004", "Fracture of forearm (disorder)", clinical="resolved", onset=365 * 28, abated=365 * 28 - 40)
    body, a = response_for(service, young.bundle())
    assert body["cards"] == [] and a.context.bone_diagnoses == []


def _treated_for_six_years_with_ra(pid: str) -> Patient:
    """A healed hip fracture, RA since 8 years, alendronate weekly for the last 6 years."""
    p = Patient(pid, age=74)
    _healed_hip_fracture(p, 2500)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=3000)
    p.med_request("alendronic acid 70 MG Oral Tablet", None, start=365 * 6, text="70 mg by mouth once a week")
    return p


def test_a_treated_patient_is_told_when_and_what_next(service):
    """The drug-holiday review comes from the real duration (ASBMR 2016: 5 years oral) and only without high-risk
    features: a healed hip fracture means continue, no holiday."""
    body, a = response_for(service, _treated_for_six_years_with_ra("tr1").bundle())
    card = body["cards"][0]
    assert not a.context.treatment_gap and card["indicator"] == "info"         # treated: the card informs
    since = (AS_OF - timedelta(days=365 * 6)).isoformat()[:7]
    assert f"Already on osteoporosis therapy: alendronic acid 70 MG Oral Tablet, 70 mg weekly, since {since}" \
        in card["detail"].replace("\\", "")
    assert ("Next decision: 6 years of oral bisphosphonate, still high risk (a hip or vertebral fracture): continue, "
            "no drug holiday (ASBMR 2016: up to 10 years).") in card["detail"].replace("\\", "")
    low_risk = Patient("tr1b", age=74)
    low_risk.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=3000)
    low_risk.obs("38267-1", "DXA Lumbar spine [T-score] Bone density", -2.1, "{T-score}", 100)
    low_risk.med_request("alendronic acid 70 MG Oral Tablet", None, start=365 * 6, text="70 mg by mouth once a week")
    _, a = response_for(service, low_risk.bundle())
    assert a.context.next_decision == "6 years of oral bisphosphonate: review fracture risk for a drug holiday (ASBMR 2016)"
    den = Patient("tr2", age=74)
    den.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=3000)
    den.med_admin_with_reference("denosumab 60 MG/ML Prefilled Syringe", "993449", days_ago=200, dose_mg=60)
    _, a = response_for(service, den.bundle())
    due = (AS_OF - timedelta(days=200 - 183)).isoformat()
    assert a.context.next_decision.startswith(f"next denosumab dose due {due}: a delayed or missed dose causes rebound")


def test_on_therapy_the_causes_that_appeared_since_lead_and_older_ones_are_listed(service):
    """Issue 11: a treated patient's card names only the causes that appeared since therapy began; RA known
    before alendronate is listed, the drug-holiday review leads, and the secondary-cause search is not
    ordered again (monitoring labs only)."""
    p = _treated_for_six_years_with_ra("tr3")
    body, a = response_for(service, p.bundle())
    card = body["cards"][0]
    since = (AS_OF - timedelta(days=365 * 6)).isoformat()[:7]
    assert [f.cause.id for f in a.known_before_treatment] == ["rheumatoid_arthritis"]
    assert card["summary"] == (f"On alendronate since {since}: 6 years of oral bisphosphonate, still high risk (a hip "
                               "or vertebral fracture): continue, no drug holiday (ASBMR 2016: up to 10 years).")[:139] \
        or card["summary"].startswith(f"On alendronate since {since}")
    assert "Possible causes of secondary osteoporosis" not in card["detail"]
    assert "- Rheumatoid arthritis: Rheumatoid arthritis, unspecified" in card["detail"]      # listed, with its date
    orders = [act["description"] for s in card["suggestions"] for act in s["actions"]]
    assert "Order PTH, intact" not in orders and "Order CBC" in orders
    # a cause that appeared after alendronate began leads the card, with its tests
    p.med_request("predniSONE 5 MG Oral Tablet", "312617", start=200, dose=2, dose_unit="{tbl}",
                  text="Take 2 tablets by mouth daily")
    body, a = response_for(service, p.bundle())
    card = body["cards"][0]
    assert card["summary"] == f"On alendronate since {since}; new since then: long-term glucocorticoids. Consider workup."
    assert "**Systemic glucocorticoid therapy**" in card["detail"]
    assert "Rheumatoid arthritis: Rheumatoid arthritis, unspecified" in card["detail"]


def test_kidney_caution_shows_the_latest_egfr_before_antiresorptives(service):
    p = Patient("kd1", sex="male", age=80)
    _healed_hip_fracture(p)
    for value, d in ((31, 300), (28, 20)):
        p.obs("98979-8", "eGFR (CKD-EPI 2021)", value, "mL/min/{1.73_m2}", d)
    body, a = response_for(service, p.bundle())
    detail = body["cards"][0]["detail"]
    day = (AS_OF - timedelta(days=20)).isoformat()
    assert f"**Kidney function: eGFR 28 mL/min/1.73 m2 on {day}**" in detail
    assert "denosumab carries a boxed warning for severe hypocalcaemia" in detail
    normal = Patient("kd2", sex="male", age=80)
    _healed_hip_fracture(normal)
    normal.obs("98979-8", "eGFR (CKD-EPI 2021)", 72, "mL/min/{1.73_m2}", 20)
    body, a = response_for(service, normal.bundle())
    assert "Kidney function" not in body["cards"][0]["detail"] and a.context.latest_egfr[0] == 72


def _ordered(card: dict) -> list[str]:
    return [a["resource"]["code"]["coding"][0]["code"] for s in card["suggestions"] for a in s["actions"]]


def test_extended_workup_with_low_bone_density_each_test_once(service):
    """Osteoporosis on record: the secondary-cause search (PTH, TSH, urine calcium, SPEP/FLC from 50,
    tTG-IgA, testosterone for men); myeloma's own SPEP/FLC is not ordered twice."""
    p = Patient("ext1", sex="male", age=68)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=300)
    p.condition(ICD, "C90.00", "Multiple myeloma not having achieved remission", onset=200)
    body, _ = response_for(service, p.bundle())
    codes = _ordered(body["cards"][0])
    assert len(codes) == len(set(codes))
    assert {"2777-1", "2731-8", "3016-3", "6874-2", "24351-9", "31017-7", "2986-8"} <= set(codes)
    young = Patient("ext2", sex="male", age=44)
    young.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=300)
    assert "24351-9" not in _ordered(response_for(service, young.bundle())[0]["cards"][0])     # SPEP from 50


def test_a_panel_is_done_only_when_its_key_components_were_resulted(service):
    glucose_only = Patient("cmp1", sex="female", age=70)
    glucose_only.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=300)
    glucose_only.obs("2345-7", "Glucose [Mass/volume] in Serum or Plasma", 98, "mg/dL", 30)
    glucose_only.obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 9.4, "mg/dL", 30)
    codes = _ordered(response_for(service, glucose_only.bundle())[0]["cards"][0])
    assert "24323-8" in codes                         # calcium alone is not a metabolic panel
    full = Patient("cmp2", sex="female", age=70)
    full.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=300)
    for code, name, value, unit in (("17861-6", "Calcium", 9.4, "mg/dL"), ("1751-7", "Albumin", 4.1, "g/dL"),
                                    ("2160-0", "Creatinine", 0.8, "mg/dL"), ("6768-6", "Alkaline phosphatase", 70, "U/L")):
        full.obs(code, name, value, unit, 30)
    body, a = response_for(service, full.bundle())
    codes = _ordered(body["cards"][0])
    assert "wk_cmp" in a.context.workup_done and "24323-8" not in codes
    assert codes[codes.index("2731-8") + 1] == "17861-6"          # PTH comes with a calcium drawn with it


def test_no_testosterone_on_androgen_deprivation_and_no_dxa_in_pregnancy(service):
    adt = Patient("adt1", sex="male", age=72)
    adt.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=300)
    adt.med_request("leuprolide acetate 22.5 MG Injection", "42375", start=200, text="22.5 mg IM every 3 months")
    assert "2986-8" not in _ordered(response_for(service, adt.bundle())[0]["cards"][0])
    pregnant = Patient("preg1", sex="female", age=31)
    pregnant.condition(ICD, "K50.90", "Crohn's disease, unspecified, without complications", onset=2000)
    pregnant.condition(SCT, "72892002", "Normal pregnancy (finding)", onset=120)
    body, a = response_for(service, pregnant.bundle())
    assert a.context.pregnant and not {"77080", "77085"} & set(_ordered(body["cards"][0]))
    assert "Pregnant: no DXA is suggested." in body["cards"][0]["detail"]


def test_hyperparathyroidism_adds_a_forearm_dxa(service):
    p = Patient("phpt1", age=64)
    p.condition(ICD, "E21.0", "Primary hyperparathyroidism", onset=300)
    dxa = next(s for s in response_for(service, p.bundle())[0]["cards"][0]["suggestions"] if "DXA" in s["label"])
    assert [a["resource"]["code"]["coding"][0]["code"] for a in dxa["actions"]] == ["77080", "77081"]


def test_repeated_records_are_one_line(service):
    """Synthea re-records a condition at every visit and renews orders: the card shows one line each."""
    p = Patient("grp1", sex="male", age=70)
    for d in (3000, 2000, 1000, 100):
        p.condition(SCT, "69896004", "Rheumatoid arthritis (disorder)", onset=d)
    for start in (700, 520, 340, 160):
        p.med_request("omeprazole 20 MG Delayed Release Oral Capsule", "7646", status="completed", start=start,
                      dose=20, supply=180)
    body, a = response_for(service, p.bundle())
    detail = body["cards"][0]["detail"]
    assert detail.count("Rheumatoid arthritis \\(disorder\\)") == 1 and "recorded 4 times" in detail
    ppi = next(f for f in a.findings if f.cause.id == "ppi")
    assert ppi.evidence[0].text.startswith("omeprazole 20 MG Delayed Release Oral Capsule, 20 mg/day, 4 records ")
    assert len(ppi.references) == 4


# ---- the quiet firing policy (scope.firing_policy: quiet) --------------------------------------
@pytest.fixture(scope="module")
def quiet():
    from cds_service.knowledge.catalog import load_catalog
    cat = load_catalog()
    cat.settings["firing_policy"] = "quiet"
    return SecondaryOsteoporosis(Toolkit(cat, FhirClient()))


def test_quiet_policy_lists_weak_contributors_and_never_fires_on_them_alone(quiet, standard):
    p = Patient("q1", sex="male", age=35)
    p.obs("72166-2", "Tobacco smoking status", value_cc=("449868002", "Smokes tobacco daily (finding)"), days_ago=30)
    p.obs("62292-8", "25-Hydroxyvitamin D3+25-Hydroxyvitamin D2", 14, "ng/mL", 30)
    p.med_request("omeprazole 20 MG Delayed Release Oral Capsule", "7646", start=500, dose=20)
    assert response_for(quiet, p.bundle())[0]["cards"] == []
    _, a = response_for(quiet, p.bundle())
    assert {f.cause.id for f in a.findings} >= {"smoking", "vitamin_d_deficiency"}      # found and listed, not firing
    assert not any(f.fires_alone for f in a.findings)
    assert response_for(standard, p.bundle())[0]["cards"]                 # the standard policy fires


def test_quiet_policy_age_gates_and_exceptions(quiet):
    young_ra = Patient("q2", age=38)
    young_ra.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=900)
    assert response_for(quiet, young_ra.bundle())[0]["cards"] == []
    old_ra = Patient("q3", age=58)
    old_ra.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=900)
    card = response_for(quiet, old_ra.bundle())[0]["cards"][0]
    assert card["indicator"] == "info"                                    # info by default
    aud = Patient("q4", sex="male", age=40)
    aud.condition("http://snomed.info/sct", "7200002", "Alcoholism (disorder)", onset=900)
    assert response_for(quiet, aud.bundle())[0]["cards"]                  # a use disorder fires alone
    lamo = Patient("q5", age=40)
    lamo.med_request("lamotrigine 100 MG Oral Tablet", "28439", start=400, dose=100)
    assert response_for(quiet, lamo.bundle())[0]["cards"] == []
    phenytoin = Patient("q6", age=40)
    phenytoin.med_request("phenytoin 100 MG Extended Release Oral Capsule", "8183", start=400, dose=100, per_day=3)
    assert response_for(quiet, phenytoin.bundle())[0]["cards"]            # enzyme-inducing


def test_quiet_policy_warns_only_where_it_says(quiet):
    gc = Patient("q7", sex="male", age=66)                                 # no DXA in 2 years
    gc.med_request("prednisone 10 MG Oral Tablet", "8640", start=200, dose=10)
    assert response_for(quiet, gc.bundle())[0]["cards"][0]["indicator"] == "warning"
    g3 = Patient("q8", sex="male", age=70)                                 # CKD G3 alone: listed
    for value, d in ((48, 300), (45, 20)):
        g3.obs("98979-8", "eGFR (CKD-EPI 2021)", value, "mL/min/{1.73_m2}", d)
    assert response_for(quiet, g3.bundle())[0]["cards"] == []
    g4 = Patient("q9", sex="male", age=70)                                 # G4 with untreated osteoporosis
    g4.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=300)
    for value, d in ((27, 300), (25, 20)):
        g4.obs("98979-8", "eGFR (CKD-EPI 2021)", value, "mL/min/{1.73_m2}", d)
    body, a = response_for(quiet, g4.bundle())
    assert body["cards"][0]["indicator"] == "warning" and next(f for f in a.findings if f.cause.id == "ckd").warning


def test_the_numbers_a_clinician_checks_are_on_the_card(service):
    p = Patient("num1", sex="female", age=69)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=900)
    p.obs("98979-8", "eGFR (CKD-EPI 2021)", 64, "mL/min/{1.73_m2}", 40)
    p.obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 9.6, "mg/dL", 40)
    p.obs("62292-8", "25-Hydroxyvitamin D3+25-Hydroxyvitamin D2", 50, "nmol/L", 40)      # 20 ng/mL
    day = (AS_OF - timedelta(days=40)).isoformat()
    detail = response_for(service, p.bundle())[0]["cards"][0]["detail"]
    assert f"Latest results: eGFR 64 ({day}); calcium 9.6 mg/dL ({day}); 25-OH vitamin D 20 ng/mL ({day})." in detail


def test_override_reasons_include_the_ones_clinicians_asked_for(service):
    card = response_for(service, ra_only())[0]["cards"][0]
    codes = {r["code"] for r in card["overrideReasons"]}
    assert {"already-treated", "record-out-of-date", "goals-of-care", "workup-elsewhere"} <= codes


def ra_only() -> dict:
    p = Patient("ovr1", age=66)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=900)
    return p.bundle()


def test_vertebral_fracture_assessment_follows_iscd_and_frax_is_asked_for(service):
    """ISCD 2023: VFA with the DXA for a T-score below -1.0 from 70 (women); a woman of 64 with the same
    T-score gets a plain DXA. From age 40 the card asks for FRAX unless one is on record within 2 years."""
    def woman(pid, age, frax=None):
        p = Patient(pid, age=age)
        p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=900)
        p.obs("38263-0", "DXA Femur [T-score] Bone density", -1.6, "{T-score}", 1100, category="imaging")
        if frax is not None:
            p.obs("90265-0", "Major osteoporotic fracture 10-year probability [Likelihood] Fracture Risk Assessment",
                  frax, "%", 100)
        return response_for(service, p.bundle())[0]["cards"][0]

    old = woman("vfa1", 74)
    assert "Order DXA with vertebral fracture assessment (age and T-score, ISCD)" in [s["label"] for s in old["suggestions"]]
    assert "No FRAX in the last 730 days: calculate the 10-year fracture probability" in old["detail"]
    young = woman("vfa2", 64, frax=12.4)
    assert "Order DXA bone density scan" in [s["label"] for s in young["suggestions"]]
    day = (AS_OF - timedelta(days=100)).isoformat()
    assert f"FRAX 10-year major osteoporotic fracture probability 12% on {day}." in young["detail"]
