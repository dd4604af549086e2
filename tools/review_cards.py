"""The clinical review set: representative patients and the card each gets, as a clinician sees it.

    .venv/bin/python tools/review_cards.py [--detail] [--policy standard|quiet]

Patients are coded the way Synthea and EHRs code them (fixtures/generate.py). Reviewers run this after
changing cards/ to see every kind of card at once: summary, indicator, order labels and (with --detail)
the Markdown detail.
"""
from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.fhir.bundles import request_from_bundle  # noqa: E402
from cds_service.knowledge.catalog import load_catalog  # noqa: E402
from cds_service.fhir.fhir_client import FhirClient  # noqa: E402
from cds_service.services import ServiceRegistry  # noqa: E402
from fixtures.generate import ICD, Patient  # noqa: E402
from fixtures.generate_orders import LETROZOLE, LEUPROLIDE, PRED20, draft, dxa, labs  # noqa: E402

AS_OF = date(2026, 6, 30)
SCT = "http://snomed.info/sct"


def egfr(p: Patient, value: float, days_ago: int) -> None:
    p.obs("98979-8", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood "
          "by Creatinine-based formula (CKD-EPI 2021)", value, "mL/min/{1.73_m2}", days_ago)


def review_set() -> list[tuple[str, Patient]]:
    out = []
    p = Patient("r01", sex="female", age=58)
    p.med_request("prednisone 5 MG Oral Tablet", "8640", start=200, dose=5)
    out.append(("Glucocorticoids, prednisone 5 mg/day for 6 months", p, None))
    p = Patient("r02", sex="male", age=64)
    p.med_request("prednisone 10 MG Oral Tablet", "8640", start=130, dose=10)
    out.append(("Glucocorticoids, prednisone 10 mg/day for 4 months", p, None))
    p = Patient("r03", sex="female", age=47)
    p.med_request("prednisone 20 MG Oral Tablet", "8640", start=60, dose=40)
    out.append(("Glucocorticoids, prednisone 40 mg/day for 2 months", p, None))
    p = Patient("r04", sex="female", age=61)
    p.med_request("anastrozole 1 MG Oral Tablet", "84857", start=380, dose=1)
    out.append(("Aromatase inhibitor, anastrozole for a year", p, None))
    p = Patient("r05", sex="male", age=72)
    p.med_request("leuprolide acetate 22.5 MG Injection", "42375", start=200, text="22.5 mg IM every 3 months")
    out.append(("Androgen deprivation, leuprolide every 3 months", p, None))
    p = Patient("r06", sex="female", age=55)
    for d in (120, 20):
        p.obs("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", 0.04, "m[IU]/L", d, low=0.4, high=4.0)
    out.append(("Hyperthyroidism from labs only (TSH 0.04 twice)", p, None))
    p = Patient("r07", sex="female", age=66)
    p.obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 11.1, "mg/dL", 25, low=8.6, high=10.3)
    p.obs("2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", 92, "pg/mL", 25, low=15, high=65)
    out.append(("Primary hyperparathyroidism pattern (calcium 11.1, PTH 92)", p, None))
    p = Patient("r08", sex="male", age=74)
    p.condition(SCT, "431857002", "Chronic kidney disease stage 4 (disorder)", onset=900)
    for value, d in ((27, 300), (24, 20)):
        egfr(p, value, d)
    p.med_request("prednisone 10 MG Oral Tablet", "8640", start=150, dose=10)
    out.append(("CKD G4 on prednisone 10 mg/day", p, None))
    p = Patient("r09", sex="female", age=78)
    p.condition(SCT, "359817006", "Closed fracture of hip (disorder)", clinical="resolved", onset=700, abated=620)
    out.append(("Untreated osteoporosis: healed hip fracture at 76, no therapy", p, None))
    p = Patient("r10", sex="female", age=71)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=2400)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=3000)
    p.med_request("alendronic acid 70 MG Oral Tablet", None, start=365 * 6, text="70 mg by mouth once a week")
    out.append(("Treated osteoporosis: alendronate for 6 years, RA", p, None))
    p = Patient("r11", sex="male", age=24)
    p.obs("72166-2", "Tobacco smoking status", value_cc=("449868002", "Smokes tobacco daily (finding)"), days_ago=30)
    out.append(("A young smoker (24)", p, None))
    p = Patient("r12", sex="female", age=82)
    p.med_request("sertraline 50 MG Oral Tablet", "36437", start=900, dose=50)
    p.med_request("furosemide 40 MG Oral Tablet", "4603", start=900, dose=40)
    p.med_request("warfarin sodium 5 MG Oral Tablet", "11289", start=900, dose=5)
    p.med_request("omeprazole 20 MG Delayed Release Oral Capsule", "7646", start=900, dose=20)
    p.condition(SCT, "44054006", "Diabetes mellitus type 2 (disorder)", onset=4000)
    p.condition(ICD, "I63.9", "Cerebral infarction, unspecified", onset=2000)
    out.append(("Many weak contributors at 82 (SSRI, loop diuretic, warfarin, PPI, T2DM, old stroke)", p, None))
    # issue 19: therapy read as a history, drug safety, advice fitted to the patient, fractures as EHRs code them
    p = Patient("r13", sex="female", age=74)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=2000)
    for d in (1020, 835, 650, 470, 285):                          # the last dose 9.5 months ago
        p.med_admin_with_reference("denosumab 60 MG/ML Prefilled Syringe", "993449", days_ago=d, dose_mg=60)
    labs(p)
    out.append(("Denosumab overdue: last dose 9.5 months ago, no follow-on", p, None))
    p = Patient("r14", sex="female", age=69)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=1500)
    p.med_request("teriparatide 20 MCG/DOSE Pen Injector", None, status="completed", start=900, end=170,
                  text="20 mcg subcutaneously daily")
    labs(p)
    out.append(("Anabolic course finished (teriparatide to 6 months ago), no antiresorptive after it", p, None))
    p = Patient("r15", sex="female", age=77)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=3000)
    p.med_request("alendronic acid 70 MG Oral Tablet", None, start=365 * 6, text="70 mg by mouth once a week")
    p.condition(ICD, "S32.010A", "Wedge compression fracture of first lumbar vertebra, initial encounter for closed "
                "fracture", onset=120)
    labs(p)
    out.append(("Fracture on therapy: L1 fracture after 6 years of alendronate", p, None))
    p = Patient("r16", sex="female", age=33)
    p.condition(ICD, "Z3A.20", "20 weeks gestation of pregnancy", onset=40)
    p.condition(ICD, "O26.892", "Other specified pregnancy related conditions, second trimester", onset=40)
    dxa(p, -2.6, 500)
    labs(p)
    out.append(("Pregnancy at order-sign: prednisone 20 mg for 3 months at 20 weeks (O-codes, Z3A)", p,
                [draft(p.pid, 1, *PRED20, "Take 1 tablet by mouth daily", dose=1, supply=30, repeats=2)]))
    p = Patient("r17", sex="female", age=68)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=400)
    p.obs("6768-6", "Alkaline phosphatase [Enzymatic activity/volume] in Serum or Plasma", 25, "U/L", 30, low=40,
          high=129)
    labs(p)
    out.append(("Low ALP (25 U/L) with untreated osteoporosis, alendronate ordered", p,
                [draft(p.pid, 1, "alendronate sodium 70 MG Oral Tablet", "46041", "Take 1 tablet by mouth weekly",
                       dose=1, per_day=1 / 7, supply=84, repeats=3)]))
    p = Patient("r18", sex="female", age=19)
    p.condition(ICD, "F50.01", "Anorexia nervosa, restricting type", onset=700)
    p.obs("39156-5", "Body mass index (BMI) [Ratio]", 15.8, "kg/m2", 30, category="vital-signs")
    p.obs("38267-1", "DXA Lumbar spine [T-score] Bone density", -2.8, "{T-score}", 60, category="imaging")
    p.obs("85394-5", "DXA Lumbar spine [Z-score] Bone density", -2.6, "{Z-score}", 60, category="imaging")
    out.append(("Anorexia nervosa at 19 with a low spine Z-score", p, None))
    p = Patient("r19", sex="female", age=34)
    p.condition(ICD, "Z39.1", "Encounter for care and examination of lactating mother", onset=150)
    p.condition(ICD, "S32.010A", "Wedge compression fracture of first lumbar vertebra, initial encounter for closed "
                "fracture", onset=40)
    p.condition(ICD, "S22.060A", "Wedge compression fracture of T7-T8 vertebra, initial encounter for closed fracture",
                onset=40)
    out.append(("Lactation-associated vertebral fractures at 34", p, None))
    p = Patient("r20", sex="female", age=58)
    p.condition(ICD, "E21.0", "Primary hyperparathyroidism", onset=400)
    p.obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 11.6, "mg/dL", 25, low=8.6, high=10.3)
    p.obs("2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", 140, "pg/mL", 25, low=15, high=65)
    p.obs("38267-1", "DXA Lumbar spine [T-score] Bone density", -2.7, "{T-score}", 90, category="imaging")
    out.append(("Primary hyperparathyroidism meeting surgical criteria (calcium 11.6, T-score -2.7)", p, None))
    p = Patient("r21", sex="male", age=76)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=600)
    egfr(p, 28, 30)
    out.append(("Untreated osteoporosis at eGFR 28", p, None))
    p = Patient("r22", sex="female", age=81)
    p.condition(ICD, "S72.001A", "Fracture of unspecified part of neck of right femur, initial encounter for closed "
                "fracture", onset=50)
    out.append(("Hip fracture coded only as ICD-10-CM S72.001A", p, None))
    p = Patient("r23", sex="male", age=72)
    p.condition(None, None, "T12 wedge compression deformity", onset=200)
    out.append(("Vertebral fracture recorded only as text: 'T12 wedge compression deformity'", p, None))
    p = Patient("r24", sex="female", age=84)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=600)
    p.procedure(SCT, "385763009", "Hospice care (regime/therapy)", days_ago=20)
    out.append(("Hospice: untreated osteoporosis at 84", p, None))
    p = Patient("r25", sex="female", age=79)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=600)
    p.entries[0]["resource"]["deceasedDateTime"] = (AS_OF - timedelta(days=10)).isoformat()
    out.append(("Deceased 10 days ago: untreated osteoporosis on record", p, None))
    p = Patient("r26", sex="female", age=71)
    p.condition(ICD, "S52.501A", "Unspecified fracture of the lower end of right radius, initial encounter for closed "
                "fracture", onset=20)
    p.obs("38263-0", "DXA Femur [T-score] Bone density", -0.4, "{T-score}", 20, category="imaging")
    out.append(("Wrist fracture with a normal DXA the same week", p, None))
    p = Patient("r27", sex="female", age=31)
    p.condition(ICD, "N80.0", "Endometriosis of uterus", onset=400)
    out.append(("Leuprolide 6 months for endometriosis at order-sign (a woman)", p,
                [draft(p.pid, 1, *LEUPROLIDE, "11.25 mg intramuscular injection every 3 months", dose=11.25,
                       dose_unit="mg", per_day=None, supply=180, route="Intramuscular route (qualifier value)")]))
    p = Patient("r28", sex="female", age=32)
    p.condition(ICD, "N97.0", "Female infertility associated with anovulation", onset=300)
    out.append(("Letrozole 5 days for ovulation induction at order-sign", p,
                [draft(p.pid, 1, *LETROZOLE, "Take 1 tablet by mouth daily on cycle days 3-7", dose=1,
                       quantity=5)]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detail", action="store_true", help="print each card's Markdown detail too")
    ap.add_argument("--policy", choices=("standard", "quiet"), default=None,
                    help="override scope.firing_policy (the catalog's default is quiet)")
    args = ap.parse_args()
    catalog = load_catalog()
    if args.policy:
        catalog.settings["firing_policy"] = args.policy
    registry = ServiceRegistry(catalog, FhirClient())
    for n, (title, patient, drafts) in enumerate(review_set(), 1):
        if drafts is None:
            cards = registry.get("secondary-osteoporosis").invoke(request_from_bundle(patient.bundle()), AS_OF)
        else:
            request = request_from_bundle(patient.bundle(), hook_instance=f"review-{n}")
            request["hook"] = "order-sign"
            request["context"] = {"userId": "Practitioner/reviewer", "patientId": patient.pid,
                                  "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                                  "entry": [{"resource": d} for d in drafts]}}
            cards = registry.get("bone-protection-order-sign").invoke(request, AS_OF)
        cards = cards.response["cards"]
        print(f"### {n}. {title}")
        if not cards:
            print("no card\n")
            continue
        card = cards[0]
        print(f"- **{card['indicator']}**: {card['summary']}")
        orders = [a["description"] for s in card.get("suggestions", []) for a in s["actions"]]
        print(f"- orders: {'; '.join(orders) or 'none'}")
        if args.detail:
            print("\n" + card["detail"])
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
