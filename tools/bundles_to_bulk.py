"""Write patient Bundles as a FHIR Bulk Data export: one `Type.ndjson` (or `.ndjson.gz`) per resource type and a
completion manifest, as a server's `$export` leaves them. For testing `cds-service screen` on labelled corpora.

    .venv/bin/python tools/bundles_to_bulk.py ../shared/dev-corpus/data OUT [--gzip] [--files-per-type N]

What a FHIR server does on the way is done here too: `urn:uuid:` and full-URL references become `Type/id`
(cds_service.fhir.bundles), a resource with no id gets a stable one (a digest of its content), and a compartment
resource that names no patient gets its Bundle's Patient as `subject` or `patient` (a server stores it that way,
so the export shows it so). Medication resources are written once (the same id twice with different content is
an error). Input files are read in name order and resources keep their order, so the output is reproducible."""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.fhir.bundles import bundle_resources  # noqa: E402

# where each type names its patient (the Patient compartment of FHIR R4)
PATIENT_FIELD = {"Condition": "subject", "Observation": "subject", "Procedure": "subject",
                 "MedicationRequest": "subject", "MedicationStatement": "subject", "MedicationAdministration": "subject",
                 "MedicationDispense": "subject", "Encounter": "subject", "Immunization": "patient",
                 "FamilyMemberHistory": "patient", "AllergyIntolerance": "patient", "DiagnosticReport": "subject",
                 "Claim": "patient", "ExplanationOfBenefit": "patient", "CarePlan": "subject", "Goal": "subject"}
SHARED_TYPES = {"Medication", "Practitioner", "Organization", "Location", "PractitionerRole"}


def _stable_id(resource: dict) -> str:
    return hashlib.sha256(json.dumps(resource, sort_keys=True).encode()).hexdigest()[:32]


def patient_resources(bundle: dict) -> list[dict]:
    """The Bundle's resources as a FHIR server would export them (ids, references, patient links)."""
    for entry in bundle.get("entry") or ():
        res = entry.get("resource") if isinstance(entry, dict) else None
        full = entry.get("fullUrl") if isinstance(entry, dict) else None
        if isinstance(res, dict) and not isinstance(res.get("id"), str) and not (
                isinstance(full, str) and full.startswith("urn:uuid:")):
            res["id"] = _stable_id(res)
    resources = bundle_resources(bundle)
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    for res in resources:
        field = PATIENT_FIELD.get(res["resourceType"])
        if patient is not None and field and not _names_a_patient(res):
            res[field] = {"reference": f"Patient/{patient['id']}"}
    return resources


def _names_a_patient(res: dict) -> bool:
    for key in ("subject", "patient", "beneficiary"):
        ref = res.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and "Patient/" in ref["reference"]:
            return True
    return False


def convert(inputs: list[Path], out: Path, compress: bool = False, files_per_type: int = 1) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[str]] = defaultdict(list)
    shared: dict[tuple[str, str], str] = {}
    for path in inputs:
        for res in patient_resources(json.loads(path.read_text(encoding="utf-8"))):
            line = json.dumps(res, separators=(",", ":"), ensure_ascii=False)
            rt = res["resourceType"]
            if rt in SHARED_TYPES:
                key = (rt, res["id"])
                if key in shared:
                    if shared[key] != line:
                        raise SystemExit(f"{path}: {rt}/{res['id']} differs from an earlier copy")
                    continue
                shared[key] = line
            by_type[rt].append(line)
    manifest = {"transactionTime": "2026-06-30T00:00:00Z", "request": "bundles_to_bulk.py", "requiresAccessToken": False,
                "output": [], "error": []}
    for rt, lines in sorted(by_type.items()):
        parts = max(1, min(files_per_type, len(lines)))
        size = -(-len(lines) // parts)
        for i in range(parts):
            name = f"{rt}.{i:03d}.ndjson" + (".gz" if compress else "")
            data = ("\n".join(lines[i * size:(i + 1) * size]) + "\n").encode()
            (out / name).write_bytes(gzip.compress(data, mtime=0) if compress else data)
            manifest["output"].append({"type": rt, "url": name, "count": len(lines[i * size:(i + 1) * size])})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {rt: len(v) for rt, v in by_type.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="Bundle files or folders of *.json Bundles")
    ap.add_argument("out", help="folder to write the export into")
    ap.add_argument("--gzip", action="store_true", help="write .ndjson.gz, as many servers do")
    ap.add_argument("--files-per-type", type=int, default=1, help="split each type over this many files")
    a = ap.parse_args(argv)
    files: list[Path] = []
    for name in a.inputs:
        p = Path(name)
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    counts = convert(files, Path(a.out), a.gzip, a.files_per_type)
    print(f"{len(files)} bundles -> {a.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
