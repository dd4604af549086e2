"""The clinical review set: twelve representative patients and the card each gets, as a clinician sees it.

    .venv/bin/python tools/review_cards.py [--detail] [--policy standard|quiet]

Patients are coded the way Synthea and EHRs code them (fixtures/generate.py). Reviewers run this after
changing cards/ to see every kind of card at once: summary, indicator, order labels and (with --detail)
the Markdown detail.
"""
from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.bundles import request_from_bundle  # noqa: E402
from cds_service.catalog import load_catalog  # noqa: E402
from cds_service.fhir_client import FhirClient  # noqa: E402
from cds_service.services import SecondaryOsteoporosis, Toolkit  # noqa: E402
from fixtures.generate import ICD, Patient  # noqa: E402

AS_OF = date(2026, 6, 30)
SCT = "http://snomed.info/sct"


def egfr(p: Patient, value: float, days_ago: int) -> None:
    p.obs("98979-8", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood "
          "by Creatinine-based formula (CKD-EPI 2021)", value, "mL/min/{1.73_m2}", days_ago)


def review_set() -> list[tuple[str, Patient]]:
    out = []
    p = Patient("r01", sex="female", age=58)
    p.med_request("prednisone 5 MG Oral Tablet", "8640", start=200, dose=5)
    out.append(("Glucocorticoids, prednisone 5 mg/day for 6 months", p))
    p = Patient("r02", sex="male", age=64)
    p.med_request("prednisone 10 MG Oral Tablet", "8640", start=130, dose=10)
    out.append(("Glucocorticoids, prednisone 10 mg/day for 4 months", p))
    p = Patient("r03", sex="female", age=47)
    p.med_request("prednisone 20 MG Oral Tablet", "8640", start=60, dose=40)
    out.append(("Glucocorticoids, prednisone 40 mg/day for 2 months", p))
    p = Patient("r04", sex="female", age=61)
    p.med_request("anastrozole 1 MG Oral Tablet", "84857", start=380, dose=1)
    out.append(("Aromatase inhibitor, anastrozole for a year", p))
    p = Patient("r05", sex="male", age=72)
    p.med_request("leuprolide acetate 22.5 MG Injection", "42375", start=200, text="22.5 mg IM every 3 months")
    out.append(("Androgen deprivation, leuprolide every 3 months", p))
    p = Patient("r06", sex="female", age=55)
    for d in (120, 20):
        p.obs("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", 0.04, "m[IU]/L", d, low=0.4, high=4.0)
    out.append(("Hyperthyroidism from labs only (TSH 0.04 twice)", p))
    p = Patient("r07", sex="female", age=66)
    p.obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 11.1, "mg/dL", 25, low=8.6, high=10.3)
    p.obs("2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", 92, "pg/mL", 25, low=15, high=65)
    out.append(("Primary hyperparathyroidism pattern (calcium 11.1, PTH 92)", p))
    p = Patient("r08", sex="male", age=74)
    p.condition(SCT, "431857002", "Chronic kidney disease stage 4 (disorder)", onset=900)
    for value, d in ((27, 300), (24, 20)):
        egfr(p, value, d)
    p.med_request("prednisone 10 MG Oral Tablet", "8640", start=150, dose=10)
    out.append(("CKD G4 on prednisone 10 mg/day", p))
    p = Patient("r09", sex="female", age=78)
    p.condition(SCT, "359817006", "Closed fracture of hip (disorder)", clinical="resolved", onset=700, abated=620)
    out.append(("Untreated osteoporosis: healed hip fracture at 76, no therapy", p))
    p = Patient("r10", sex="female", age=71)
    p.condition(ICD, "M81.0", "Age-related osteoporosis without current pathological fracture", onset=2400)
    p.condition(ICD, "M06.9", "Rheumatoid arthritis, unspecified", onset=3000)
    p.med_request("alendronic acid 70 MG Oral Tablet", None, start=365 * 6, text="70 mg by mouth once a week")
    out.append(("Treated osteoporosis: alendronate for 6 years, RA", p))
    p = Patient("r11", sex="male", age=24)
    p.obs("72166-2", "Tobacco smoking status", value_cc=("449868002", "Smokes tobacco daily (finding)"), days_ago=30)
    out.append(("A young smoker (24)", p))
    p = Patient("r12", sex="female", age=82)
    p.med_request("sertraline 50 MG Oral Tablet", "36437", start=900, dose=50)
    p.med_request("furosemide 40 MG Oral Tablet", "4603", start=900, dose=40)
    p.med_request("warfarin sodium 5 MG Oral Tablet", "11289", start=900, dose=5)
    p.med_request("omeprazole 20 MG Delayed Release Oral Capsule", "7646", start=900, dose=20)
    p.condition(SCT, "44054006", "Diabetes mellitus type 2 (disorder)", onset=4000)
    p.condition(ICD, "I63.9", "Cerebral infarction, unspecified", onset=2000)
    out.append(("Many weak contributors at 82 (SSRI, loop diuretic, warfarin, PPI, T2DM, old stroke)", p))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detail", action="store_true", help="print each card's Markdown detail too")
    ap.add_argument("--policy", choices=("standard", "quiet"), default=None, help="override scope.firing_policy")
    args = ap.parse_args()
    catalog = load_catalog()
    if args.policy:
        catalog.settings["firing_policy"] = args.policy
    service = SecondaryOsteoporosis(Toolkit(catalog, FhirClient()))
    for n, (title, patient) in enumerate(review_set(), 1):
        cards = service.invoke(request_from_bundle(patient.bundle()), AS_OF).response["cards"]
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
