"""How many patients get a card, and how many of those cards are warnings, under each policy.

    .venv/bin/python tools/card_share.py ../shared/dev-corpus [--policy standard|quiet|both]

Reads a labelled corpus folder (labels.csv with file and as_of columns, bundles beside it) and evaluates
every bundle on its own as-of date, for `scope.firing_policy` x `scope.indicator_policy` in
cards/catalog.yaml: standard/standard (every strong cause warns), standard/quiet (the default) and
quiet/quiet (the clinical review's stricter firing). The figure a site reviews before switching.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.fhir.bundles import request_from_bundle  # noqa: E402
from cds_service.knowledge.catalog import load_catalog  # noqa: E402
from cds_service.fhir.fhir_client import FhirClient  # noqa: E402
from cds_service.services import SecondaryOsteoporosis, Toolkit  # noqa: E402


def share(corpus: Path, firing: str, indicator: str) -> dict:
    catalog = load_catalog()
    catalog.settings["firing_policy"] = firing
    catalog.settings["indicator_policy"] = indicator
    service = SecondaryOsteoporosis(Toolkit(catalog, FhirClient()))
    counts: Counter = Counter()
    by_label: Counter = Counter()
    with (corpus / "labels.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            bundle = orjson.loads((corpus / row["file"]).read_bytes())
            result = service.invoke(request_from_bundle(bundle), date.fromisoformat(row["as_of"]))
            cards = result.response["cards"]
            counts["patients"] += 1
            if cards:
                counts["with_card"] += 1
                counts[cards[0]["indicator"]] += 1
                by_label[row.get("should_alert", "?")] += 1
    return {"policy": f"{firing}/{indicator}", **counts, "cards_by_label": dict(by_label)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--policy", choices=("standard", "quiet", "both"), default="both")
    args = ap.parse_args()
    combos = {"standard": [("standard", "standard"), ("standard", "quiet")], "quiet": [("quiet", "quiet")]}
    chosen = combos["standard"] + combos["quiet"] if args.policy == "both" else combos[args.policy]
    print("firing/indicator policy")
    for firing, indicator in chosen:
        r = share(args.corpus, firing, indicator)
        policy = r["policy"]
        n, cards = r["patients"], r.get("with_card", 0)
        warn = r.get("warning", 0)
        print(f"{policy:17s} patients {n}, with a card {cards} ({cards / n:.0%}), warning {warn} "
              f"({warn / cards if cards else 0:.0%} of cards), cards by label {r['cards_by_label']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
