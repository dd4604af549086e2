"""Osteoporosis therapy as a history: courses over the whole record, each with its start, last dose, next dose and
state (current, overdue, finished, stopped), read by the classes in cards/therapy.yaml.

A snapshot of "an order in the last 12 months" misreads therapy both ways: yearly re-orders and yearly infusions never
reach the drug-holiday review, a denosumab injection 9 months ago reads as "untreated", a teriparatide course that
ended reads as current. Courses fix that: records of one class closer than the class's gap are one course, interval
drugs (denosumab, zoledronic acid) are read by their dose dates, continuous ones by the days their orders cover.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

from ..knowledge.catalog import Catalog
from ..fhir.record import MedicationExposure, PatientRecord

CURRENT, OVERDUE, FINISHED, STOPPED = "current", "overdue", "finished", "stopped"


@dataclass
class Course:
    """One course of one class of osteoporosis medicine."""

    drug: str                        # the drug of its newest record ("alendronate")
    cls: dict                        # its therapy.yaml class
    start: date
    last: date                       # the last dose (interval drugs) or the last day covered (continuous), <= as_of
    newest_record: date              # the newest record's start: when it was last ordered, given or filled
    references: list[str]
    ongoing_order: bool = False      # an order or statement still active
    state: str = CURRENT
    next_due: date | None = None     # interval drugs: the next dose
    doses: int = 0                   # interval drugs: dose dates on record
    label: str = ""                  # the newest record's name and regimen, in words ("alendronate 70 MG ..., 70 mg weekly")

    @property
    def class_id(self) -> str:
        return self.cls["id"]

    @property
    def reference(self) -> str:
        return self.references[0]

    def years(self, as_of: date) -> float:
        return ((min(self.last, as_of) if self.state != CURRENT else as_of) - self.start).days / 365.25

    def is_antiresorptive(self) -> bool:
        return bool(self.cls.get("antiresorptive"))


@dataclass
class TherapyHistory:
    courses: list[Course] = field(default_factory=list)       # oldest first

    @property
    def current(self) -> list[Course]:
        return [c for c in self.courses if c.state == CURRENT]

    def latest(self, class_id: str) -> Course | None:
        return next((c for c in reversed(self.courses) if c.class_id == class_id), None)

    def antiresorptive_since(self, day: date) -> Course | None:
        """The first antiresorptive course that started on or after `day`."""
        return next((c for c in self.courses if c.is_antiresorptive() and c.start >= day), None)


class TherapyReader:
    """Reads the record's osteoporosis medicines into courses (therapy.yaml `therapy`)."""

    def __init__(self, catalog: Catalog):
        self.cat = catalog
        self.cfg = catalog.therapy["therapy"]
        self.classes = catalog.treatment_classes
        self.grace = timedelta(days=self.cfg.get("grace_days", 30))
        self.local_words = {c["id"]: [w.lower() for w in c.get("local_words", [])] for c in self.cfg["classes"]}

    def drug_of(self, m: MedicationExposure) -> tuple[str, dict] | None:
        """(drug name, class) of an osteoporosis medicine record that counts as bone therapy, or None: contraceptive
        estrogen (ethinyl estradiol) and local estrogen (a vaginal cream) are not bone therapy."""
        name = next((i.name for i in m.ingredients if i.cause_id == "osteoporosis_treatment" and i.name in self.classes),
                    None)
        if name is None:
            return None
        cls = self.classes[name]
        text = f"{m.text} {m.route_text}".lower()
        if "ethinyl" in text:
            return None
        if any(w in text for w in self.local_words[cls["id"]]):
            return None
        return name, cls

    def read(self, rec: PatientRecord) -> TherapyHistory:
        by_class: dict[str, list[tuple[MedicationExposure, str, dict]]] = {}
        for m in rec.medications:
            if m.planned or m.start is None or m.start > rec.as_of:
                continue
            found = self.drug_of(m)
            if found is None:
                continue
            by_class.setdefault(found[1]["id"], []).append((m, *found))
        courses: list[Course] = []
        for items in by_class.values():
            courses += self._courses(items, rec.as_of)
        courses.sort(key=lambda c: c.start)
        history = TherapyHistory(courses)
        for c in courses:
            self._state(c, history, rec.as_of)
        return history

    def _courses(self, items: list[tuple[MedicationExposure, str, dict]], as_of: date) -> list[Course]:
        items.sort(key=lambda x: x[0].start)
        out: list[Course] = []
        for m, name, cls in items:
            covered = self._covered_to(m, cls, as_of)
            gap = timedelta(days=cls["course_gap_days"])
            course = out[-1] if out else None
            if course is not None and m.start <= course.last + gap:
                course.last = max(course.last, covered)
                if m.start >= course.newest_record:
                    course.drug, course.newest_record = name, m.start
                    course.label = f"{m.label or name}{m.regimen()}"
                course.references.append(m.reference)
                course.ongoing_order = course.ongoing_order or (m.ongoing and not m.single_dose)
                course.doses += 1
            else:
                out.append(Course(name, cls, m.start, covered, m.start, [m.reference],
                                  ongoing_order=m.ongoing and not m.single_dose, doses=1,
                                  label=f"{m.label or name}{m.regimen()}"))
        return out

    def _covered_to(self, m: MedicationExposure, cls: dict, as_of: date) -> date:
        """The last day a record covers: its dose day for interval drugs (an active order is not a dose given), the
        days its order or fill covers for continuous ones."""
        if cls.get("dose_every_days") or m.single_dose or m.resource_type == "MedicationAdministration":
            return m.start
        if m.ongoing:
            return as_of
        if m.end and m.end > m.start:
            return min(m.end, as_of)
        return min(m.start + timedelta(days=cls.get("covered_days_per_record", 1) - 1), as_of)

    def _state(self, c: Course, history: TherapyHistory, as_of: date) -> None:
        cls = c.cls
        every = cls.get("dose_every_days")
        if every:
            c.next_due = c.last + timedelta(days=every)
            since = (as_of - c.last).days
            on_time = cls.get("overdue_after_days", every + self.grace.days)
            if since <= on_time:
                c.state = CURRENT
            elif cls.get("overdue_after_days") and since <= cls.get("overdue_until_days", 730) \
                    and history.antiresorptive_since(c.last + timedelta(days=1)) is None:
                c.state = OVERDUE
            else:
                c.state = STOPPED
            return
        if c.last >= as_of - self.grace:
            c.state = CURRENT
        else:
            c.state = FINISHED if cls.get("anabolic") else STOPPED

    # ---- what the history means for the patient ------------------------------------------------------
    def treated(self, history: TherapyHistory, as_of: date) -> list[Course]:
        """Courses that make the patient "on osteoporosis therapy" today: current ones, and stopped bisphosphonates
        within their residual effect (a drug holiday is still treatment)."""
        out = []
        for c in history.courses:
            if c.state == CURRENT:
                out.append(c)
            elif c.state == STOPPED and c.cls.get("residual_effect_days") \
                    and (as_of - c.last).days <= c.cls["residual_effect_days"]:
                out.append(c)
        return out

    def stale(self, c: Course, as_of: date) -> bool:
        """An active order not renewed for a long time: shown as "last ordered on", not as ongoing."""
        return c.ongoing_order and (as_of - c.newest_record).days > self.cfg.get("stale_order_days", 400)
