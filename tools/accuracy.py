"""Sensitivity and specificity of the engine on the labelled fixtures (fixtures/labels.json).

    python tools/accuracy.py [--per-cause]

A cause counts as found when `evaluate --explain` lists it in `findings`.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.fhir.bundles import request_from_bundle  # noqa: E402
from cds_service.knowledge.catalog import load_catalog  # noqa: E402
from cds_service.fhir.fhir_client import FhirClient  # noqa: E402
from cds_service.services import SecondaryOsteoporosis, Toolkit, explain  # noqa: E402


def evaluate_labelled(service: SecondaryOsteoporosis | None = None) -> dict:
    labels = json.loads((ROOT / "fixtures/labels.json").read_text())
    as_of = date.fromisoformat(labels["as_of"])
    service = service or SecondaryOsteoporosis(Toolkit(load_catalog(), FhirClient()))
    causes = sorted(service.catalog.causes)
    per = {c: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for c in causes}
    mismatches = []
    for rel, label in labels["patients"].items():
        bundle = json.loads((ROOT / "fixtures" / rel).read_text())
        found = {f["cause"] for f in explain(service.invoke(request_from_bundle(bundle), as_of).assessment)}
        expected = set(label["causes"])
        if found != expected:
            mismatches.append((rel, sorted(expected - found), sorted(found - expected)))
        for c in causes:
            key = ("t" if (c in found) == (c in expected) else "f") + ("p" if c in found else "n")
            per[c][key] += 1
    tot = {k: sum(v[k] for v in per.values()) for k in ("tp", "fp", "fn", "tn")}
    return {"patients": len(labels["patients"]), "per_cause": per, "total": tot, "mismatches": mismatches}


def rate(a: int, b: int) -> str:
    return f"{a / (a + b):.3f}" if a + b else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-cause", action="store_true")
    args = ap.parse_args()
    r = evaluate_labelled()
    t = r["total"]
    print(f"patients: {r['patients']}  cause-level decisions: {sum(t.values())}")
    print(f"sensitivity {rate(t['tp'], t['fn'])} ({t['tp']}/{t['tp'] + t['fn']})  "
          f"specificity {rate(t['tn'], t['fp'])} ({t['tn']}/{t['tn'] + t['fp']})")
    if args.per_cause:
        print(f"{'cause':34} {'TP':>4} {'FN':>4} {'FP':>4} {'TN':>5}  sens   spec")
        for c, v in r["per_cause"].items():
            print(f"{c:34} {v['tp']:4} {v['fn']:4} {v['fp']:4} {v['tn']:5}  {rate(v['tp'], v['fn']):5}  {rate(v['tn'], v['fp'])}")
    for rel, missed, extra in r["mismatches"]:
        print(f"MISMATCH {rel}: missed {missed} extra {extra}")
    return 0 if not r["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
