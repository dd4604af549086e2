"""Scale a Bulk Data export up by copying its patients: each copy gets its own Patient id (and resource ids), so a
small real export (a few Synthea patients of ~3 MB each) becomes one of thousands, with the same mix of types,
sizes and codes, for the screen benchmark (`bench/run.py --only screen --screen-export OUT`).

    .venv/bin/python tools/replicate_export.py EXPORT OUT --copies 50

A line that names one of the export's patients is written once per copy, with that patient's id (and the line's
own id) suffixed by the copy number; a line that names none (Medication, Practitioner, Organization, Location) is
written once. Files keep their names (`.ndjson.gz` is read, `.ndjson` written). The copies are clinically the same
patients: this measures speed, never recognition."""
from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import orjson


def replicate(export: Path, out: Path, copies: int) -> dict[str, int]:
    """Lines written per file name."""
    files = sorted(p for p in export.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    patient_ids = set()
    for f in files:
        if f.name.startswith("Patient."):
            with _open(f) as src:
                patient_ids |= {orjson.loads(line)["id"] for line in src if line.strip()}
    if not patient_ids:
        raise SystemExit(f"{export}: no Patient file with patients")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for f in files:
        name = f.name.removesuffix(".gz")
        n = 0
        with _open(f) as src, open(out / name, "wb") as dst:
            for line in src:
                line = line.rstrip(b"\n")
                if not line.strip():
                    continue
                pid, own = _patient_of(line, patient_ids)
                if pid is None:
                    dst.write(line + b"\n")
                    n += 1
                    continue
                for k in range(copies):
                    copy = line.replace(pid.encode(), f"{pid}-{k}".encode())
                    if own and own != pid:
                        copy = copy.replace(f'"id":"{own}"'.encode(), f'"id":"{own}-{k}"'.encode(), 1)
                    dst.write(copy + b"\n")
                    n += 1
        written[name] = n
    return written


def _patient_of(line: bytes, patient_ids: set[str]) -> tuple[str | None, str | None]:
    """The patient a line names (as its id, or in a reference) and the line's own id."""
    try:
        res = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, None
    own = res.get("id") if isinstance(res, dict) and isinstance(res.get("id"), str) else None
    if own in patient_ids:
        return own, own
    for field in ("subject", "patient", "beneficiary"):
        ref = res.get(field) if isinstance(res, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            pid = ref["reference"].rsplit("/", 1)[-1]
            if pid in patient_ids:
                return pid, own
    return None, own


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--copies", type=int, required=True)
    args = ap.parse_args(argv)
    written = replicate(args.export, args.out, args.copies)
    size = sum((args.out / n).stat().st_size for n in written)
    print(f"{args.export} x{args.copies} -> {args.out}: {sum(written.values()):,} lines, {size / 1e6:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
