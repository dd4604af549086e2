"""Freeze behaviour across a refactor: `cds-service evaluate --explain` on every fixture and every patient of the
development corpora, written to one file per input (fresh uuids blanked), and a comparison of two such folders.

    .venv/bin/python tools/explain_snapshot.py write build/explain-before
    ... refactor ...
    .venv/bin/python tools/explain_snapshot.py write build/explain-after
    .venv/bin/python tools/explain_snapshot.py compare build/explain-before build/explain-after

Fixtures are evaluated on their as-of date (2026-06-30), corpus patients on their labels' `as_of`. Exit status 1
when any output differs (each difference is named)."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service import cli  # noqa: E402

CORPUS = ROOT.parent / "shared" / "dev-corpus"
FIXTURE_AS_OF = "2026-06-30"
_UUID = re.compile(rb'"uuid":"[0-9a-f-]{36}"')


def inputs() -> dict[str, list[Path]]:
    """as_of -> files evaluated on that date."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for folder in ("patients", "labelled", "orders", "requests"):
        groups[FIXTURE_AS_OF] += sorted((ROOT / "fixtures" / folder).glob("*.json"))
    for corpus in (CORPUS, CORPUS / "messy"):
        with open(corpus / "labels.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                groups[row["as_of"]].append(corpus / row["file"])
    return groups


def write(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for as_of, files in sorted(inputs().items()):
        # the CLI itself, in this process (the catalog loads once, not once per date)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            status = cli.main(["evaluate", "--explain", "--as-of", as_of, *map(str, files)])
        lines = buffer.getvalue().encode().splitlines()
        if status != 0 or len(lines) != len(files):
            raise SystemExit(f"evaluate gave {len(lines)} lines for {len(files)} files on {as_of} (exit {status})")
        for path, line in zip(files, lines):
            name = str(path.relative_to(ROOT.parent)).replace("/", "__")
            (out / name).write_bytes(_UUID.sub(b'"uuid":""', line) + b"\n")
            count += 1
    print(f"{count} outputs written to {out}")
    return 0


def compare(a: Path, b: Path) -> int:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differing = [n for n in names if not (a / n).is_file() or not (b / n).is_file()
                 or (a / n).read_bytes() != (b / n).read_bytes()]
    for n in differing:
        print(f"differs: {n}")
    print(f"{len(names) - len(differing)} of {len(names)} outputs byte-identical")
    return 1 if differing else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the outputs into a folder")
    w.add_argument("out", type=Path)
    c = sub.add_parser("compare", help="compare two folders byte for byte")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    return write(args.out) if args.cmd == "write" else compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
