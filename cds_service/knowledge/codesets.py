"""Named code sets for the card's context (pregnancy, lactation, hospice, fracture sites, ...), built once from the
catalog's detection sections: each section's own codes (ICD-10-CM prefixes included) and the VSAC expansions it names.

A section answers one question about a coded entry: does any of its codings belong here? The record builder keeps
every Condition and Procedure a section holds; the engine asks the section which entries it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

# detection.yaml sections read as code sets (each lists `codes` and/or `value_sets`)
SECTIONS = ("kidney_caution", "pregnancy", "lactation", "end_of_life", "cardiovascular_events", "breast_cancer",
            "kidney_stones", "menopause", "oesophageal_disorder")


def icd_key(code: str) -> str:
    """ICD codes compare without dots and case ('e05.90' and 'E0590' are the same code)."""
    return code.replace(".", "").strip().upper()


@dataclass(frozen=True)
class CodeSet:
    """Codes by (system, code) (ICD-10-CM dotless), and ICD-10-CM prefixes that hold their descendants."""

    name: str
    exact: frozenset
    icd_prefixes: frozenset

    @classmethod
    def of(cls, name: str, entries: Iterable[dict], normalize) -> "CodeSet":
        exact, prefixes = set(), set()
        for c in entries:
            system = normalize(c["system"])
            if c.get("match") == "prefix":
                prefixes.add(icd_key(c["code"]))
            else:
                exact.add((system, icd_key(c["code"]) if system == ICD10CM else c["code"].strip()))
        return cls(name, frozenset(exact), frozenset(prefixes))

    def holds(self, system: str, code: str) -> bool:
        """`system` already normalized (the record stores it so)."""
        if system == ICD10CM:
            key = icd_key(code)
            if (system, key) in self.exact:
                return True
            return any(key[:n] in self.icd_prefixes for n in range(3, min(len(key), 8) + 1))
        return (system, code) in self.exact

    def any_of(self, codes: Iterable[tuple[str, str]]) -> bool:
        return any(self.holds(s, c) for s, c in codes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.icd_prefixes)
