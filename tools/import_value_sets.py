"""Fill cards/value_sets.yaml with published VSAC expansions, recording where each came from.

    python tools/import_value_sets.py GIT_DIR --repository OWNER/NAME [--commit REV] [--force] OID [OID ...]

GIT_DIR is a clone of a public eCQM content repository (e.g. cqframework/ecqm-content-qicore-2024)
whose `input/vocabulary/valueset/external/valueset-<OID>.json` files hold VSAC expansions. Each
OID's entry in value_sets.yaml is created (or, with --force, replaced) by the expansion as published, with its
VSAC version and `source` (repository, commit, path), so a reviewer can check every code. The
catalog test refuses a value set with codes but no source unless it matches the reference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VALUE_SETS = ROOT / "cards" / "value_sets.yaml"
SYSTEMS = {   # VSAC spells a few systems its own way; the catalog uses FHIR's canonical URIs
    "http://hl7.org/fhir/sid/icd-10-cm": "http://hl7.org/fhir/sid/icd-10-cm",
    "http://snomed.info/sct": "http://snomed.info/sct",
    "http://loinc.org": "http://loinc.org",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://www.ama-assn.org/go/cpt": "http://www.ama-assn.org/go/cpt",
    "http://www.cms.gov/Medicare/Coding/ICD10": "http://www.cms.gov/Medicare/Coding/ICD10",
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    "http://hl7.org/fhir/sid/icd-9-cm": "http://hl7.org/fhir/sid/icd-9-cm",
    "http://www.nlm.nih.gov/research/umls/hcpcs": "http://www.nlm.nih.gov/research/umls/hcpcs",
}
HEADER = ("# VSAC value-set expansions. Entries with `source` were imported by tools/import_value_sets.py from a\n"
          "# published eCQM content repository (VSAC version and commit recorded); the others are as found in\n"
          "# shared/reference (some partial: stored_codes < code_counts).\n")


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("git_dir")
    ap.add_argument("oids", nargs="+")
    ap.add_argument("--commit", default="HEAD")
    ap.add_argument("--repository", required=True, help="owner/name of the public repository, recorded as the source")
    ap.add_argument("--force", action="store_true", help="replace a value set already in the catalog by a different one")
    a = ap.parse_args(argv)
    commit = git(a.git_dir, "rev-parse", a.commit).strip()
    data = yaml.safe_load(VALUE_SETS.read_text())
    entries = {v["oid"]: v for v in data["value_sets"]}
    for oid in a.oids:
        path = f"input/vocabulary/valueset/external/valueset-{oid}.json"
        vs = json.loads(git(a.git_dir, "show", f"{commit}:{path}"))
        codes = []
        for c in vs.get("expansion", {}).get("contains", []):
            system = SYSTEMS.get(c["system"])
            if system is None:
                print(f"{oid}: unknown system {c['system']}", file=sys.stderr)
                return 2
            codes.append({"system": system, "code": c["code"], "display": c.get("display", "")})
        counts = Counter(c["system"].rstrip("/").rsplit("/", 1)[-1] for c in codes)
        entry = {
            "oid": oid, "name": vs.get("title") or vs.get("name"), "url": vs["url"], "version": str(vs.get("version")),
            "source": {"repository": a.repository, "commit": commit, "path": path},
            "code_counts": dict(counts), "stored_codes": len(codes), "codes": codes,
        }
        if oid in entries and entries[oid] != entry and not a.force:
            print(f"{oid}: already in {VALUE_SETS.name} with other content (reviewed?): refusing to replace it "
                  "without --force", file=sys.stderr)
            return 2
        entries[oid] = entry
        print(f"{oid} {entry['name']} v{entry['version']}: {len(codes)} codes {dict(counts)}")
    data["value_sets"] = list(entries.values())
    VALUE_SETS.write_text(HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
