"""Code survey for onboarding a site: every distinct coding in a set of bundles, and what the catalog
makes of it.

An informaticist runs `cds-service codes EXPORT_DIR --unmatched` on a site's sample export to see
which codes its charts use that the catalog does not know, most common first. Three kinds of row say
what the engine did without a code it knows, so a site can add its codes as data:
- "Medication, by text": a drug code (NDC, local formulary key, branded RxNorm) the catalog does not
  list, read through the product name in its text;
- "Condition, suspected": a diagnosis recorded as provisional, differential or "rule out": listed,
  never firing a card on its own;
- "Observation, computed": an eGFR the laboratory did not report, computed from creatinine.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Iterable, TextIO

import orjson

from ..fhir.bundles import request_from_bundle
from ..knowledge.catalog import Catalog, normalize_system
from ..errors import ServiceError
from ..fhir.record import ComputedEgfr, PatientRecord, RecordBuilder, codings, concept_text

TEXT_ONLY = "(text only)"          # the system column of a Condition recorded with no code
BY_TEXT = "Medication, by text"    # a drug code the catalog does not list, read by the product name in its text
SUSPECTED = "Condition, suspected"
COMPUTED = "Observation, computed"
_MEDICATION_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationAdministration", "MedicationDispense")


@dataclass
class CodingRow:
    resource_type: str
    system: str
    code: str
    display: str
    patients: set[str] = field(default_factory=set)
    meaning: str = ""
    to_add: bool = False               # read without a code the catalog knows: listed by --unmatched too


def bundle_files(paths: Iterable[str]) -> list[Path]:
    """Files named, and every *.json in folders named (in name order)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise ValueError(f"{p} holds no *.json files")
            out += found
        else:
            out.append(p)
    return out


class CodeSurvey:
    def __init__(self, catalog: Catalog, as_of: date | None = None):
        self.cat = catalog
        self.builder = RecordBuilder(catalog)
        self.as_of = as_of or date.today()
        self.rows: dict[tuple[str, str, str], CodingRow] = {}
        self.files = 0
        self.unreadable: list[str] = []

    def _row(self, key: tuple[str, str, str], display: str, meaning, patient: str, to_add: bool = False) -> None:
        row = self.rows.get(key)
        if row is None:
            code = "" if key[1] == TEXT_ONLY else key[2]         # a text-only entry is keyed by its text
            row = self.rows[key] = CodingRow(key[0], key[1], code, display or "", to_add=to_add)
            row.meaning = meaning() if callable(meaning) else meaning
        row.patients.add(patient)

    def add_file(self, path: Path) -> None:
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            self.unreadable.append(f"{path}: {type(exc).__name__}")
            return
        self.files += 1
        self.add_bundle(data, str(path))

    def add_bundle(self, data: object, name: str) -> None:
        """Every coding of one patient's Bundle (the patient is its Patient's id, else `name`)."""
        entries = data.get("entry") if isinstance(data, dict) else None
        resources = [e["resource"] for e in entries or () if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        patient = next((str(r.get("id")) for r in resources if r.get("resourceType") == "Patient"), name)
        for res in resources:
            rt = res.get("resourceType")
            if rt in ("Condition", "Procedure", "Observation"):
                concepts = [res.get("code")]
            elif rt in _MEDICATION_TYPES:       # the drug inline, or a Medication contained in the record
                concepts = [res.get("medicationCodeableConcept")] + [
                    m.get("code") for m in res.get("contained") or () if isinstance(m, dict)
                    and m.get("resourceType") == "Medication"]
            elif rt == "Medication":
                concepts = [res.get("code")]
            else:
                continue
            for concept in concepts:
                if rt == "Condition" and not any(isinstance(c.get("code"), str) for c in codings(concept)):
                    text = concept_text(concept).strip()
                    if text:                        # a problem-list entry recorded as text only
                        self._row((rt, TEXT_ONLY, text.lower()), text, lambda t=text: self._text_meaning(t), patient)
                    continue
                for c in codings(concept):
                    if not isinstance(c.get("code"), str):
                        continue
                    system = normalize_system(c.get("system"))
                    display = c.get("display") if isinstance(c.get("display"), str) else concept_text(concept)
                    if rt in _MEDICATION_TYPES or rt == "Medication":
                        self._medication_row(system, c["code"], display, concept_text(concept), patient)
                        continue
                    self._row((rt, system, c["code"]), display,
                              lambda k=rt, sy=system, co=c["code"], d=display: self._meaning(k, sy, co, d or ""), patient)
        self._read_rows(data, patient)

    def _medication_row(self, system: str, code: str, display: str, text: str, patient: str) -> None:
        """A drug code the catalog lists gets its meaning; one it does not, whose product name the engine read
        in the text instead, gets a "Medication, by text" row (the code to add, and what its text said)."""
        for kind in ("Medication", BY_TEXT):         # seen before: its meaning is known, only the patient is new
            row = self.rows.get((kind, system, code))
            if row is not None:
                row.patients.add(patient)
                return
        if self.builder._ingredients_coded(system, code):
            self._row(("Medication", system, code), display, lambda: self._meaning("Medication", system, code, ""),
                      patient)
            return
        by_text = self._meaning("Medication", system, code, " ".join(filter(None, (display, text))))
        if by_text:
            self._row((BY_TEXT, system, code), display or text, by_text + " - read by its text: add the code as data",
                      patient, to_add=True)
        else:
            self._row(("Medication", system, code), display or text, "", patient)

    def _read_rows(self, data: dict, patient: str) -> None:
        """What the engine made of the chart beyond its codes: suspected diagnoses and computed eGFRs."""
        try:
            body = request_from_bundle(data)
            rec = self.builder.build(body.get("prefetch") or {}, body["context"]["patientId"], self.as_of)
        except (ServiceError, ValueError, KeyError, TypeError):
            return                              # the coding rows above still stand
        self._suspected_rows(rec, patient)
        for lst in rec.observations.values():
            for m in lst:
                if isinstance(m, ComputedEgfr):
                    cr = m.creatinine
                    self._row((COMPUTED, "CKD-EPI 2021", cr.code), f"eGFR from creatinine (LOINC {cr.code})",
                              "kidney function: eGFR computed (no eGFR reported)", patient, to_add=True)

    def _suspected_rows(self, rec: PatientRecord, patient: str) -> None:
        for c in rec.conditions:
            if not c.suspected:
                continue
            causes = sorted({cid for cid, _ in c.matches}) or ["bone context"]
            meaning = "suspected " + ", ".join(causes) + ": listed, never fires a card on its own"
            for system, code in c.codes or [(TEXT_ONLY, c.text.lower())]:
                self._row((SUSPECTED, system, code), c.text, meaning, patient, to_add=True)

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
        names = sorted({f"osteoporosis treatment ({i.name})" if i.cause_id == "osteoporosis_treatment"
                        else f"card context {i.cause_id.partition(':')[2]} ({i.name})" if i.cause_id.startswith("context:")
                        else f"cause {i.cause_id} ({i.name})" for i in ingredients})
        return "; ".join(names)

    def sorted_rows(self, unmatched_only: bool = False) -> list[CodingRow]:
        rows = [r for r in self.rows.values() if not (unmatched_only and r.meaning and not r.to_add)]
        return sorted(rows, key=lambda r: (-len(r.patients), r.resource_type, r.system, r.code))

    def summary(self) -> str:
        total = len(self.rows)
        mapped = sum(1 for r in self.rows.values() if r.meaning)
        by_type = defaultdict(lambda: [0, 0])
        for r in self.rows.values():
            by_type[r.resource_type][0] += 1
            by_type[r.resource_type][1] += bool(r.meaning)
        detail = ", ".join(f"{t} {m}/{n}" for t, (n, m) in sorted(by_type.items()) if t not in (BY_TEXT, SUSPECTED, COMPUTED))
        read = {kind: sum(1 for r in self.rows.values() if r.resource_type == kind) for kind in (BY_TEXT, SUSPECTED, COMPUTED)}
        return (f"{self.files} files, {total} distinct codings, {mapped} with a meaning in the catalog ({detail}); "
                f"{read[BY_TEXT]} drug codes read by their text, {read[SUSPECTED]} suspected diagnoses, "
                f"eGFR computed from {read[COMPUTED]} creatinine codes")


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
        err: TextIO = sys.stderr, as_of: date | None = None) -> int:
    survey = CodeSurvey(catalog, as_of)
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
