"""Conditions and procedures read against the catalog: codes, text with its negation and certainty cues,
fracture sites, the problem list reconciled with encounter diagnoses."""
from __future__ import annotations

import re
from datetime import date
from typing import Any


from ...knowledge.catalog import ICD10CM, icd_prefix_match, normalize_system, normalize_text
from ...jsonutil import as_list
from .validation import parse_date
from .values import _code, _short, CodedEntry, codings, concept_label, concept_text, MAX_CODE_CHARS, MAX_TEXT_CHARS, PatientRecord


def status_code(concept: Any) -> str | None:
    for c in codings(concept):
        if isinstance(c.get("code"), str):
            return c["code"]
    return None


def _reconcile(rec: PatientRecord) -> None:
    """Read the problem list per concept, as a clinician does: when the newest copy of a condition
    (Synthea and many EHRs re-record it at each visit) is resolved or refuted, the older copies
    left active are stale. An active copy as new as the newest closed one stands.
    The problem list outranks encounter diagnoses (billing copies, often without a status): a cause
    the problem list refutes is not revived by an encounter diagnosis of any date, and one it closed
    is not revived by encounter diagnoses up to that date, in whatever code system they are written."""
    closed = rec.closed_concepts
    kept = []
    for c in rec.conditions:
        if not c.historic and c.when is not None and any(closed.get(key, date.min) > c.when for key in c.codes):
            rec.superseded += 1
            continue
        if c.category == ENCOUNTER_DIAGNOSIS and c.matches and all(
                cause in rec.refuted_causes or (c.when is not None and rec.closed_causes.get(cause, date.min) >= c.when)
                for cause, _role in c.matches):
            rec.superseded += 1
            continue
        kept.append(c)
    rec.conditions = kept


ENCOUNTER_DIAGNOSIS = "encounter-diagnosis"


def _is_encounter_diagnosis(res: dict) -> bool:
    return any(c.get("code") == ENCOUNTER_DIAGNOSIS for cat in as_list(res.get("category")) for c in codings(cat))


def _negated_prefix(low: str, start: int) -> bool:
    """"non-cystic fibrosis bronchiectasis": a name with "non-" directly in front of it names something else (while
    "non-Hodgkin lymphoma" is a lymphoma: there the prefix belongs to another word)."""
    return low[max(0, start - 4):start] in ("non-", "non ")


# ICD-10-CM chapter XX transport accidents (V00-V99): the injury that day was high-energy
_TRANSPORT_ACCIDENT = re.compile(r"[Vv]\d\d")

# cues are read within this many characters of a name (a coded entry's text: of its start and end), and text is
# matched on its first MAX_TEXT_CHARS characters: linear time whatever a record carries
_CUE_WINDOW = 40


class ConditionReader:
    """Conditions and procedures: codes, text, certainty, fracture sites. Mixed into RecordBuilder, whose state it reads."""

    # ---- Conditions / Procedures ----------------------------------------------------------------
    def _condition_counts(self, res: dict) -> tuple[str, date | None]:
        """("counts" | "closed" | "ignored", onset or recorded date). "closed": the record says the
        condition is over (resolved, inactive, remission, abated) or refuted; entered-in-error says
        nothing about the patient and is ignored."""
        when = parse_date(res.get("onsetDateTime")) or parse_date((res.get("onsetPeriod") or {}).get("start")) \
            or parse_date(res.get("recordedDate"))
        verification = status_code(res.get("verificationStatus"))
        if verification in self.cond_verif_excluded:
            return ("ignored" if verification == "entered-in-error" else "closed"), when
        clinical = status_code(res.get("clinicalStatus"))
        if clinical is None:
            # encounter diagnoses may carry no clinical status: count them unless abated
            if any(k.startswith("abatement") for k in res):
                return "closed", when
        elif clinical not in self.cond_clinical:
            return "closed", when
        return "counts", when

    def _procedure_counts(self, res: dict) -> tuple[str, date | None]:
        if res.get("status") in self.proc_excluded:
            return "ignored", None
        when = parse_date(res.get("performedDateTime")) or parse_date((res.get("performedPeriod") or {}).get("start"))
        return "counts", when

    def _condition(self, rec: PatientRecord, res: dict, _medications: dict) -> None:
        self._coded(rec, res, rec.conditions, self._condition_counts)

    def _procedure(self, rec: PatientRecord, res: dict, _medications: dict) -> None:
        self._coded(rec, res, rec.procedures, self._procedure_counts)

    def _coded(self, rec: PatientRecord, res: dict, target: list, counts) -> None:
        rt = res["resourceType"]
        concept = res.get("code")
        cs = concept.get("coding") if isinstance(concept, dict) else None
        if isinstance(cs, list) and len(cs) == 1 and isinstance(cs[0], dict):     # the usual entry: one code
            c = cs[0]
            matches, context, codes = self._one_coding_matches(rt, _short(c.get("system")), _code(c.get("code")),
                                                               _short(concept.get("text")), _short(c.get("display")))
        else:
            matches, context, codes = self._concept_matches(rt, concept)
        if rt == "Condition" and codes and any(s == ICD10CM and _TRANSPORT_ACCIDENT.match(c) for s, c in codes):
            state, when = counts(res)
            if when is not None:
                rec.transport_accident_dates.add(when)     # a high-energy injury on that day
        as_text = False
        sections: tuple[str, ...] = ()
        site = None
        if context:
            sections = self._sections_of(codes)
            site = self._site_of(codes)
        if not matches and not context:
            text = concept_text(concept)
            if not text:
                return
            if rt == "Condition":
                if self.cat.condition_text_regex is not None:
                    matches = self._condition_text_matches(text)
                sections = self._section_text_matches(text)
                site = self._fracture_text_site(text)
            else:
                site = self._fracture_procedure_site(text)
            if not matches and not sections and site is None:
                return
            as_text = True
        state, when = counts(res)
        historic = False
        if state == "closed":
            for key in codes:                   # a newer closed copy of the concept supersedes older active ones
                if when is not None and when > rec.closed_concepts.get(key, date.min):
                    rec.closed_concepts[key] = when
            if rt == "Condition" and matches and not _is_encounter_diagnosis(res):
                refuted = status_code(res.get("verificationStatus")) == "refuted"
                for cause_id, _role in matches:  # the problem list outranks encounter diagnoses of the cause
                    if refuted:
                        rec.refuted_causes.add(cause_id)
                    if when is not None and when > rec.closed_causes.get(cause_id, date.min):
                        rec.closed_causes[cause_id] = when
            if site is None:
                return
            historic = True                     # a healed fracture is still a fracture on record
            matches = ()
        elif state != "counts":
            return
        suspected = False
        if rt == "Condition":
            certainty = self._certainty(res, concept, as_text)
            if certainty == "excluded":
                return
            suspected = certainty == "suspected"
        ref = self._keep(rec, res)
        if ref is not None:
            category = ""
            if rt == "Condition":
                category = next((c.get("code") for cat in as_list(res.get("category")) for c in codings(cat)
                                 if isinstance(c.get("code"), str)), "")
            high_energy = site is not None and self._high_energy(concept_text(concept))
            target.append(CodedEntry(ref, rt, concept_label(concept), when, list(matches), list(codes), historic, as_text,
                                     suspected, category, sections, site, high_energy))

    def _certainty(self, res: dict, concept: Any, as_text: bool) -> str:
        """"confirmed", "suspected" (provisional, differential, unconfirmed; "rule out", "?", "suspected" in its text),
        "historic" ("history of ...") or "excluded" (negated, about a relative, not the disease). A coded entry's text
        is read at its start and end only (a name matched in text was already read with its cues)."""
        if status_code(res.get("verificationStatus")) in self.cond_suspected:
            return "suspected"
        if as_text or self.cat.cues_before_regex is None:
            return "confirmed"
        text = concept.get("text") if isinstance(concept, dict) else None
        if not isinstance(text, str) or not text.strip():
            return "confirmed"
        return self._text_certainty(normalize_text(text[:MAX_TEXT_CHARS]))

    def _cue_kinds(self, text: str) -> str:
        """What the cues at the very start ("R/O ...", "FH: ...", "History of ...") or the very end ("... ruled out",
        "...?", "... - resolved") of a coded entry's text say. Only there: a cue word inside a name ("Multiple myeloma
        not having achieved remission", "lactating mother") is part of the name."""
        head = text.lstrip(" -:([*")
        kinds = set()
        m = self.cat.cues_before_regex.match(head)
        if m:
            kinds.add(self.cue_kinds_before.get(m.group(0)))
        tail = text.rstrip(" .)]-*")
        for m in self.cat.cues_after_regex.finditer(tail, max(0, len(tail) - _CUE_WINDOW)):
            kind = self.cue_kinds_after.get(m.group(0))
            if m.end() == len(tail) and kind in ("negated", "uncertain"):
                kinds.add(kind)
        if kinds & {"negated", "other_person", "not_the_disease"}:
            return "excluded"
        if "uncertain" in kinds:
            return "suspected"
        # "History of ..." on a coded entry is the code's own meaning (a history-of situation, a healed fracture)
        return "confirmed"

    def _sections_of(self, codes: tuple) -> tuple[str, ...]:
        return tuple(name for name, cs in self.cat.code_sets.items() if cs.any_of(codes))

    def _site_of(self, codes: tuple) -> str | None:
        site = next((name for name, cs in self.cat.fracture_sites.items() if cs.any_of(codes)), None)
        if site is None and self.cat.osteoporotic_fracture_codes.any_of(codes):
            return "unspecified"                # M80 or Z87.310 without a site the catalog knows
        return site

    def _section_matches(self, text: str) -> tuple[str, ...]:
        low = normalize_text(text[:MAX_TEXT_CHARS])
        return tuple(name for name, rx in self.cat.section_text_regex.items() if self._named_unhedged(rx, low))

    def _fracture_text(self, text: str) -> str | None:
        rx = self.cat.fracture_text_regex
        if rx is None:
            return None
        low = normalize_text(text[:MAX_TEXT_CHARS])
        m = self._named_unhedged(rx, low)
        return self.cat.fracture_text_sites[m.group(0)] if m else None

    def _fracture_procedure(self, text: str) -> str | None:
        rx = self.cat.fracture_procedure_regex
        if rx is None:
            return None
        m = rx.search(normalize_text(text[:MAX_TEXT_CHARS]))
        return self.cat.fracture_procedure_sites[m.group(0)] if m else None

    def _named_unhedged(self, rx: re.Pattern, low: str):
        """The first name `rx` finds in `low` with no negation, hedge, past or other-person cue around it."""
        cat = self.cat
        for m in rx.finditer(low):
            if _negated_prefix(low, m.start()):
                continue
            if cat.cues_before_regex is not None and (cat.cues_before_regex.search(low, max(0, m.start() - _CUE_WINDOW),
                                                                                 m.start())
                                                      or cat.cues_after_regex.search(low, m.end(), m.end() + _CUE_WINDOW)):
                continue
            return m
        return None

    def _high_energy(self, text: str) -> bool:
        return self.high_energy_regex is not None and self.high_energy_regex.search(
            normalize_text(text[:MAX_TEXT_CHARS])) is not None

    def _concept_matches(self, rt: str, concept: Any) -> tuple[tuple, bool, tuple]:
        """(cause matches, whether it shapes the card's context, its (system, code) pairs)."""
        matches: list[tuple[str, str]] = []
        codes: list[tuple[str, str]] = []
        context = False
        for c in codings(concept):
            code = c.get("code")
            if type(code) is str and len(code) <= MAX_CODE_CHARS:      # longer is not a code
                system = normalize_system(_short(c.get("system")))
                codes.append((system, code))
                hits, in_context = self._code_lookup(system, code)
                matches += hits
                context = context or in_context
        if rt == "Procedure" and self.procedure_words:
            matches += self._procedure_text_matches(concept_text(concept).lower())
        return tuple(matches), context, tuple(codes)

    def _text_matches(self, text: str) -> tuple[tuple[str, str], ...]:
        """Causes a Condition's text names, where no cue before or after the name negates it, hedges it,
        puts it in the past or gives it to someone else ("no celiac disease", "FH: rheumatoid arthritis",
        "?Cushing's", "Graves disease - resolved")."""
        cat = self.cat
        low = normalize_text(text[:MAX_TEXT_CHARS])
        out: list[tuple[str, str]] = []
        for m in cat.condition_text_regex.finditer(low):
            if cat.cues_before_regex.search(low, max(0, m.start() - _CUE_WINDOW), m.start()) \
                    or cat.cues_after_regex.search(low, m.end(), m.end() + _CUE_WINDOW) or _negated_prefix(low, m.start()):
                continue
            out += [(cause_id, "trigger") for cause_id in cat.condition_text_causes[m.group(0)]]
        return tuple(dict.fromkeys(out))

    def _lookup_code(self, system: str, code: str) -> tuple[tuple[tuple[str, str], ...], bool]:
        """(causes the code triggers or supports, whether it shapes the card's context). Memoized:
        the same few thousand codes fill most charts."""
        in_context = code in self.context_codes or (system == ICD10CM and icd_prefix_match(code, self.context_icd_prefixes)) \
            or any(cs.holds(system, code) for cs in self.cat.code_sets.values()) \
            or any(cs.holds(system, code) for cs in self.cat.fracture_sites.values())
        return tuple(self.cat.causes_for_code(system, code)), in_context
