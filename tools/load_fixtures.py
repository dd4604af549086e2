"""Load the fixture patients into a FHIR server (docker-compose uses it for HAPI FHIR).

    python tools/load_fixtures.py http://localhost:8090/fhir [--wait 300]

Each fixture Bundle becomes a transaction of PUTs, so resources keep their ids and the
CDS Hooks sandbox can open a patient by id (e.g. glucocorticoids-positive).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cds_service.fhir.bundles import bundle_resources  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--wait", type=float, default=300, help="seconds to wait for the server to come up")
    args = ap.parse_args()
    base = args.base.rstrip("/")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            if requests.get(base + "/metadata", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            print(f"{base} did not come up", file=sys.stderr)
            return 1
        time.sleep(3)
    files = sorted((ROOT / "fixtures").glob("patients/*.json")) + sorted((ROOT / "fixtures").glob("labelled/*.json"))
    for path in files:
        entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                   for r in bundle_resources(json.loads(path.read_text()))]
        resp = requests.post(base, json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                             headers={"Content-Type": "application/fhir+json"}, timeout=60)
        if resp.status_code >= 300:
            print(f"{path.name}: {resp.status_code} {resp.text[:300]}", file=sys.stderr)
            return 1
    print(f"loaded {len(files)} patients into {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
