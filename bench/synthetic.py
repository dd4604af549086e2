"""Deterministic synthetic patients for the benchmarks: a CDS Hooks request with ~N prefetched resources.

The mix is the hard case for the service: most Observations carry LOINC codes the rules read
(what a code-filtered prefetch returns), spread over ten years, beside ordinary conditions,
medications and procedures, with a few real causes so the engine builds a full card.
"""
from __future__ import annotations

import random
import uuid
from datetime import date, timedelta

AS_OF = date(2026, 6, 30)
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"

NOISE_CONDITIONS = [("I10", "Essential hypertension"), ("E78.5", "Hyperlipidemia"), ("K21.9", "GERD"),
                    ("M54.50", "Low back pain"), ("J06.9", "Upper respiratory infection"), ("R51.9", "Headache"),
                    ("Z00.00", "General adult exam"), ("F41.1", "Generalized anxiety disorder")]
CAUSE_CONDITIONS = [("M06.9", "Rheumatoid arthritis, unspecified"), ("E11.9", "Type 2 diabetes mellitus")]
NOISE_MEDS = [("lisinopril 10 MG Oral Tablet", "29046", 10), ("atorvastatin 20 MG Oral Tablet", "83367", 20),
              ("metFORMIN 500 MG Oral Tablet", "6809", 500), ("amLODIPine 5 MG Oral Tablet", "17767", 5),
              ("acetaminophen 500 MG Oral Tablet", "161", 500)]
CAUSE_MEDS = [("predniSONE 5 MG Oral Tablet", "8640", 7.5), ("omeprazole 20 MG Oral Capsule", "7646", 20)]
LABS = [("98979-8", "eGFR", "mL/min/{1.73_m2}", 55, 80), ("3016-3", "TSH", "mIU/L", 0.8, 3.5),
        ("62292-8", "25-OH vitamin D", "ng/mL", 15, 40), ("17861-6", "Calcium", "mg/dL", 8.8, 10.1),
        ("39156-5", "BMI", "kg/m2", 21, 29), ("29463-7", "Body weight", "kg", 55, 80),
        ("2731-8", "PTH", "pg/mL", 20, 60), ("6768-6", "ALP", "U/L", 50, 110), ("1751-7", "Albumin", "g/dL", 3.6, 4.6)]


def patient_request(n_resources: int, seed: int = 1) -> dict:
    """A patient-view request whose prefetch holds about `n_resources` resources."""
    rng = random.Random(seed * 100003 + n_resources)
    pid = f"bench-{n_resources}-{seed}"
    ref = {"reference": f"Patient/{pid}"}

    def rid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def when(max_days: int = 3650) -> str:
        return (AS_OF - timedelta(days=rng.randint(1, max_days))).isoformat()

    n_cond = max(2, n_resources // 10)
    n_med = max(2, n_resources * 15 // 100)
    n_proc = max(1, n_resources // 20)
    n_obs = max(1, n_resources - 1 - n_cond - n_med - n_proc)
    conditions = []
    for i in range(n_cond):
        code, text = CAUSE_CONDITIONS[i] if i < len(CAUSE_CONDITIONS) else rng.choice(NOISE_CONDITIONS)
        status = "active" if i < len(CAUSE_CONDITIONS) or rng.random() < 0.6 else "resolved"
        conditions.append({"resourceType": "Condition", "id": rid(), "subject": ref,
                           "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}]},
                           "code": {"coding": [{"system": ICD, "code": code, "display": text}], "text": text},
                           "onsetDateTime": when()})
    meds = []
    for i in range(n_med):
        name, code, dose = CAUSE_MEDS[i] if i < len(CAUSE_MEDS) else rng.choice(NOISE_MEDS)
        start = 400 if i < len(CAUSE_MEDS) else rng.randint(30, 3000)
        meds.append({"resourceType": "MedicationRequest", "id": rid(), "subject": ref, "intent": "order",
                     "status": "active" if i < len(CAUSE_MEDS) or rng.random() < 0.3 else "completed",
                     "authoredOn": (AS_OF - timedelta(days=start)).isoformat(),
                     "medicationCodeableConcept": {"coding": [{"system": RX, "code": code, "display": name}], "text": name},
                     "dosageInstruction": [{"text": f"{dose} mg by mouth daily",
                                            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                                            "doseAndRate": [{"doseQuantity": {"value": dose, "unit": "mg"}}]}],
                     "dispenseRequest": {"expectedSupplyDuration": {"value": 30, "unit": "days", "code": "d"},
                                         "numberOfRepeatsAllowed": 3}})
    observations = []
    for _ in range(n_obs):
        code, name, unit, lo, hi = rng.choice(LABS)
        observations.append({"resourceType": "Observation", "id": rid(), "status": "final", "subject": ref,
                             "category": [{"coding": [{"code": "laboratory"}]}],
                             "code": {"coding": [{"system": LOINC, "code": code, "display": name}], "text": name},
                             "effectiveDateTime": when() + "T09:00:00Z",
                             "valueQuantity": {"value": round(rng.uniform(lo, hi), 1), "unit": unit,
                                               "system": "http://unitsofmeasure.org", "code": unit}})
    procedures = [{"resourceType": "Procedure", "id": rid(), "status": "completed", "subject": ref,
                   "code": {"coding": [{"system": "http://snomed.info/sct", "code": "80146002", "display": "Appendectomy"}]},
                   "performedDateTime": when()} for _ in range(n_proc)]

    def bundle(resources):
        return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
                "entry": [{"fullUrl": f"https://ehr.example.org/fhir/{r['resourceType']}/{r['id']}", "resource": r,
                           "search": {"mode": "match"}} for r in resources]}

    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "fhirServer": "https://ehr.example.org/fhir",
        "context": {"userId": "Practitioner/bench", "patientId": pid},
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1956-04-02"},
            "conditions": bundle(conditions),
            "medicationRequests": bundle(meds),
            "medicationStatements": bundle([]),
            "medicationAdministrations": bundle([]),
            "medicationDispenses": bundle([]),
            "observations": bundle(observations),
            "boneHealthObservations": bundle([]),
            "procedures": bundle(procedures),
        },
    }


def resource_count(request: dict) -> int:
    n = 0
    for v in request["prefetch"].values():
        n += len(v.get("entry", [])) if v.get("resourceType") == "Bundle" else 1
    return n


def order_sign_request(n_resources: int, seed: int = 1) -> dict:
    """The same chart as `patient_request`, as an order-sign request (see `as_order_sign`)."""
    return as_order_sign(patient_request(n_resources, seed))


def as_order_sign(request: dict) -> dict:
    """A patient-view request turned into an order-sign request drafting prednisone 10 mg daily for 90 days
    (30-day supply, 2 refills): the prescribing service's usual firing case."""
    pid = request["context"]["patientId"]
    draft = {"resourceType": "MedicationRequest", "id": "draft-prednisone", "status": "draft", "intent": "order",
             "subject": {"reference": f"Patient/{pid}"},
             "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                       "code": "198145", "display": "prednisone 10 MG Oral Tablet"}]},
             "dosageInstruction": [{"text": "Take 1 tablet by mouth daily",
                                    "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                                    "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "{tbl}"}}]}],
             "dispenseRequest": {"expectedSupplyDuration": {"value": 30, "unit": "days", "code": "d"},
                                 "numberOfRepeatsAllowed": 2}}
    return {**request, "hook": "order-sign",
            "context": {**request["context"], "userId": request["context"].get("userId", "Practitioner/bench"),
                        "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                        "entry": [{"resource": draft}]}}}
