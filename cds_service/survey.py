"""Code survey for onboarding a site: every distinct coding in a set of bundles, and what the catalog
makes of it.

An informaticist runs `cds-service codes EXPORT_DIR --unmatched` on a site's sample export to see
which codes its charts use that the catalog does not know, most common first.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, TextIO

import orjson

from .catalog import Catalog, normalize_system
from .record import RecordBuilder, codings, concept_text

TEXT_ONLY = "(text only)"          # the system column of a Condition recorded with no code
_MEDICATION_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationAdministration", "MedicationDispense")


@dataclass
class CodingRow:
    resource_type: str
    system: str
    code: str
    display: str
    patients: set[str] = field(default_factory=set)
    meaning: str = ""


def bundle_files(paths: Iterable[str]) -> list[Path]:
    """Files named, and every *.json in folders named (in name order)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return out


class CodeSurvey:
    def __init__(self, catalog: Catalog):
        self.cat = catalog
        self.builder = RecordBuilder(catalog)
        self.rows: dict[tuple[str, str, str], CodingRow] = {}
        self.files = 0
        self.unreadable: list[str] = []

    def add_file(self, path: Path) -> None:
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            self.unreadable.append(f"{path}: {type(exc).__name__}")
            return
        self.files += 1
        entries = data.get("entry") if isinstance(data, dict) else None
        resources = [e["resource"] for e in entries or () if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        patient = next((str(r.get("id")) for r in resources if r.get("resourceType") == "Patient"), str(path))
        for res in resources:
            rt = res.get("resourceType")
            if rt in ("Condition", "Procedure", "Observation"):
                concepts = [res.get("code")]
            elif rt in _MEDICATION_TYPES:
                concepts = [res.get("medicationCodeableConcept")]
            elif rt == "Medication":
                concepts = [res.get("code")]
            else:
                continue
            for concept in concepts:
                if rt == "Condition" and not any(isinstance(c.get("code"), str) for c in codings(concept)):
                    text = concept_text(concept).strip()
                    if text:                        # a problem-list entry recorded as text only
                        key = (rt, TEXT_ONLY, text.lower())
                        row = self.rows.get(key)
                        if row is None:
                            row = self.rows[key] = CodingRow(rt, TEXT_ONLY, "", text)
                            row.meaning = self._text_meaning(text)
                        row.patients.add(patient)
                    continue
                for c in codings(concept):
                    if not isinstance(c.get("code"), str):
                        continue
                    system = normalize_system(c.get("system"))
                    kind = "Medication" if rt in _MEDICATION_TYPES else rt
                    key = (kind, system, c["code"])
                    row = self.rows.get(key)
                    if row is None:
                        display = c.get("display") if isinstance(c.get("display"), str) else concept_text(concept)
                        row = self.rows[key] = CodingRow(kind, system, c["code"], display or "")
                        row.meaning = self._meaning(kind, system, c["code"], row.display)
                    row.patients.add(patient)

    def _text_meaning(self, text: str) -> str:
        if self.cat.condition_text_regex is None:
            return ""
        return "; ".join(sorted({f"cause {cid} (by text)" for cid, _ in self.builder._condition_text_matches(text)}))

    def _meaning(self, kind: str, system: str, code: str, display: str) -> str:
        if kind in ("Condition", "Procedure"):
            hits, in_context = self.builder._lookup_code(system, code)
            parts = sorted({f"cause {cid}" + (" (supporting)" if role == "supporting" else "") for cid, role in hits})
            if kind == "Condition" and not parts and not in_context:
                return self._text_meaning(display)      # an unknown code: read by its text, as the engine does
            return "; ".join(parts + (["bone context"] if in_context else []))
        if kind == "Observation":
            rules = self.cat.loinc_rules.get(code, []) if system == "http://loinc.org" else []
            parts = [f"lab rule {r}" for r in dict.fromkeys(rules)]
            if system == "http://loinc.org" and code in self.cat.context_loincs:
                parts.append("card context (DXA/workup)")
            return "; ".join(parts)
        ingredients = self.builder._ingredients_of([{"system": system, "code": code}], display)
        names = sorted({f"cause {i.cause_id} ({i.name})" if i.cause_id != "osteoporosis_treatment"
                        else f"osteoporosis treatment ({i.name})" for i in ingredients})
        return "; ".join(names)

    def sorted_rows(self, unmatched_only: bool = False) -> list[CodingRow]:
        rows = [r for r in self.rows.values() if not (unmatched_only and r.meaning)]
        return sorted(rows, key=lambda r: (-len(r.patients), r.resource_type, r.system, r.code))

    def summary(self) -> str:
        total = len(self.rows)
        mapped = sum(1 for r in self.rows.values() if r.meaning)
        by_type = defaultdict(lambda: [0, 0])
        for r in self.rows.values():
            by_type[r.resource_type][0] += 1
            by_type[r.resource_type][1] += bool(r.meaning)
        detail = ", ".join(f"{t} {m}/{n}" for t, (n, m) in sorted(by_type.items()))
        return f"{self.files} files, {total} distinct codings, {mapped} with a meaning in the catalog ({detail})"


def write_table(rows: list[CodingRow], out: TextIO, as_csv: bool) -> None:
    header = ["resource", "system", "code", "display", "patients", "catalog"]
    if as_csv:
        w = csv.writer(out)
        w.writerow(header)
        for r in rows:
            w.writerow([r.resource_type, r.system, r.code, r.display, len(r.patients), r.meaning])
        return
    out.write("\t".join(header) + "\n")
    for r in rows:
        out.write("\t".join([r.resource_type, r.system, r.code, r.display, str(len(r.patients)), r.meaning or "-"]) + "\n")


def run(catalog: Catalog, paths: list[str], unmatched: bool, as_csv: bool, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
    survey = CodeSurvey(catalog)
    files = bundle_files(paths)
    missing = [str(p) for p in files if not p.exists()]
    for p in files:
        if p.exists():
            survey.add_file(p)
    write_table(survey.sorted_rows(unmatched), out, as_csv)
    for problem in missing + survey.unreadable:
        err.write(f"cds-service codes: cannot read {problem}\n")
    err.write(survey.summary() + "\n")
    return 1 if (missing or survey.unreadable) else 0
