"""Free-text sigs read as doses over time: "Take 6 tablets (60 mg total) by mouth daily for 4 weeks, then decrease by
10 mg every 2 weeks to 20 mg daily", "40 MG X 7 D, THEN 30 MG X 7 D", "30 mg every other day", "1 tab PRN".

Used only where a record carries no structured dose. Each step is a dose, how often, and for how many days (the last
step may be open: it runs to the end of what the record covers). What cannot be read is left out, never guessed: no
dose means "dose not recorded". Every pattern is linear (no nested quantifiers) and the text is read up to a fixed
length, so a pathological sig costs microseconds, not seconds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SIG_CHARS = 600          # sigs longer than this are read on their first MAX_SIG_CHARS characters
MAX_STEPS = 40               # a taper of more steps is cut here (its later steps are the smallest doses)

_NUM = r"(\d{1,4}(?:\.\d{1,3})?)"
_THEN = re.compile(r"\bthen\b|;|\bfollowed by\b", re.I)
_MG_TOTAL = re.compile(r"\(\s*" + _NUM + r"\s*mg\s+total\s*\)", re.I)
_MG = re.compile(_NUM + r"\s*(mg|milligrams?)\b", re.I)
_UNITS = re.compile(r"\b(" + r"\d{1,2}(?:\.\d{1,2})?|one|two|three|four|five|six|seven|eight|half|one half|a half"
                    + r")\s*(tablets?|tabs?|caps?|capsules?|pills?)\b", re.I)
_ML = re.compile(_NUM + r"\s*(ml|milliliters?)\b", re.I)
_FOR = re.compile(r"(?:\bfor\b|\bx)\s*" + r"(\d{1,3})\s*(d|days?|wks?|weeks?|mo|months?)\b", re.I)
_TAPER = re.compile(r"\b(?:decrease|reduce|taper|lower)\w*\s+(?:the\s+dose\s+)?by\s+" + _NUM + r"\s*mg\s+every\s+"
                    r"(\d{1,2})\s*(d|days?|wks?|weeks?)\b(?:\s+(?:to|until|down to)\s+" + _NUM + r"\s*mg)?", re.I)
_PRN = re.compile(r"\b(prn|as needed|as required|if needed|when needed)\b", re.I)
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "half": 0.5,
          "one half": 0.5, "a half": 0.5}
_DAYS = {"d": 1, "day": 1, "days": 1, "wk": 7, "wks": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30, "months": 30}


@dataclass
class SigStep:
    mg_per_dose: float
    per_day: float | None          # None: the frequency is not in the text (the caller decides)
    days: int | None               # None: open, to the end of what the record covers


@dataclass
class Sig:
    steps: list[SigStep]
    as_needed: bool

    @property
    def taper(self) -> bool:
        return len(self.steps) > 1


def _count(word: str) -> float:
    w = word.lower()
    return _WORDS[w] if w in _WORDS else float(w)


def _dose(part: str, strength_mg: float | None, mg_per_ml: float | None) -> float | None:
    m = _MG_TOTAL.search(part)
    if m:
        return float(m.group(1))
    m = _UNITS.search(part)
    if m and strength_mg is not None:
        return _count(m.group(1)) * strength_mg
    m = _ML.search(part)
    if m and mg_per_ml:
        return float(m.group(1)) * mg_per_ml
    m = _MG.search(part)
    return float(m.group(1)) if m else None


def _days(part: str) -> int | None:
    m = _FOR.search(part)
    return int(m.group(1)) * _DAYS[m.group(2).lower()] if m else None


def parse_sig(text: str, strength_mg: float | None, frequencies: list[tuple[re.Pattern, float]],
              mg_per_ml: float | None = None) -> Sig | None:
    """The sig's steps, or None when it names no dose. `frequencies`: the catalog's frequency words (first match
    wins); a step that names none takes the previous step's frequency."""
    if not text:
        return None
    text = text[:MAX_SIG_CHARS]
    steps: list[SigStep] = []
    per_day: float | None = None
    for part in _THEN.split(text):
        if len(steps) >= MAX_STEPS:
            break
        freq = next((value for pattern, value in frequencies if pattern.search(part)), None)
        per_day = freq if freq is not None else per_day
        taper = _TAPER.search(part)
        if taper and steps:
            step_mg, every = float(taper.group(1)), int(taper.group(2)) * _DAYS[taper.group(3).lower()]
            target = float(taper.group(4)) if taper.group(4) else 0.0
            dose = steps[-1].mg_per_dose * (steps[-1].per_day or 1)      # the daily dose the taper starts from
            while dose - step_mg >= target - 1e-9 and dose - step_mg > 0 and len(steps) < MAX_STEPS:
                dose -= step_mg
                steps.append(SigStep(round(dose, 3), 1.0, every))
            continue
        mg = _dose(part, strength_mg, mg_per_ml)
        if mg is None:
            continue
        steps.append(SigStep(mg, per_day, _days(part)))
    if not steps:
        return None
    return Sig(steps, _PRN.search(text) is not None)
