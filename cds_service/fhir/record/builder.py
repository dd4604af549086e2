"""The record builder: sorts a prefetch's resources by type in one pass and hands each type to its reader."""
from __future__ import annotations

from functools import lru_cache
from datetime import date


from ...knowledge.catalog import Catalog, icd_key, normalize_text, words_regex
from ...jsonutil import is_error_outcome
from .conditions import _reconcile, ConditionReader
from .medications import _bridge_fills, MedicationReader
from .observations import _computed_egfr, ObservationReader
from .validation import _malformed_date, parse_date, ValidatedResources
from .values import _MALFORMED, _WHEN, concept_text, PatientRecord


def reference_of(resource: dict) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id', '?')}"


# ---------------------------------------------------------------------------------------------
MEMO_SIZE = 8192




class RecordBuilder(ConditionReader, ObservationReader, MedicationReader):
    """Builds a PatientRecord from prefetch resources against one catalog."""

    def __init__(self, catalog: Catalog, known_valid: ValidatedResources | None = None,
                 read_windows: dict[str, int | None] | None = None):
        """`read_windows`: per LOINC code, how many days back the engine reads results (None: any
        age). Older results are left out of the record; without it every result is kept."""
        self.cat = catalog
        self.read_windows = read_windows or {}
        self._cutoffs = lru_cache(maxsize=64)(self._cutoffs_on)
        self._cutoff_days = lru_cache(maxsize=64)(self._cutoff_days_on)
        self.known_valid = known_valid if known_valid is not None else ValidatedResources()
        st = catalog.statuses
        self.cond_clinical = set(st.get("condition_clinical", []))
        self.cond_verif_excluded = set(st.get("condition_verification_excluded", []))
        self.med_excluded = {
            "MedicationRequest": set(st.get("medication_request_excluded", [])),
            "MedicationStatement": set(st.get("medication_statement_excluded", [])),
            "MedicationAdministration": set(st.get("medication_administration_excluded", [])),
            "MedicationDispense": set(st.get("medication_dispense_excluded", [])),
        }
        self.proc_excluded = set(st.get("procedure_excluded", []))
        self.stopped_order_causes = catalog.causes_reading_stopped_orders
        self.obs_counted = set(st.get("observation_counted", []))
        self.loinc_to_analyte: dict[str, str] = {}
        for rule in catalog.observation_rules.values():
            for key, analyte in (("loinc", rule.get("analyte")), ("calcium_loinc", "calcium"),
                                 ("albumin_loinc", "albumin"), ("pth_loinc", "pth"),
                                 ("weight_loinc", "weight"), ("height_loinc", "height"),
                                 ("creatinine_loinc", "creatinine")):
                for code in rule.get(key, []):
                    if analyte:
                        self.loinc_to_analyte.setdefault(code, analyte)
        self.wanted_loincs = set(catalog.loinc_rules) | set(catalog.context_loincs)
        det = catalog.detection
        # codes that shape the card's context (bone diagnoses, DXA procedures, treatment codes)
        self.context_codes: set[str] = set()
        self.context_icd_prefixes: set[str] = set()
        for group in set(det["index_conditions"]) | set(det.get("index_condition_value_sets", {})):
            codes = catalog.index_codes(group)
            self.context_codes.update(c["code"] for c in codes)
            self.context_icd_prefixes.update(icd_key(c["code"]) for c in codes if c.get("match") == "prefix")
        for key in ("procedure_cpt", "procedure_snomed"):
            self.context_codes.update(c["code"] for c in det["existing_dxa"].get(key, []))
        self.context_codes.update(c["code"] for c in det["osteoporosis_treatment"]["other_codes"])
        ms = catalog.medication_settings
        self.timing_codes = {k.upper(): float(v) for k, v in ms.get("timing_codes", {}).items()}
        self.fill_gap_days = (ms.get("fills") or {}).get("gap_allowance_days", 0)
        self.egfr_codes = list(catalog.loinc_groups.get("egfr", []))
        self.creatinine_codes = list(catalog.loinc_groups.get("creatinine", []))
        # Memos of what a code or a name means: the same few thousand fill most charts. Each is
        # bounded (least recently used out); all of them full cost about 15 MB a worker.
        memo = lru_cache(maxsize=MEMO_SIZE)
        self._code_lookup = memo(self._lookup_code)
        self._ingredients_in_text = memo(lambda text: tuple(catalog.ingredients_in_text(text)))
        self._ingredients_coded = memo(lambda system, code: tuple(catalog.ingredients_for_coding(system, code)))
        self._one_coding_ingredients = memo(
            lambda text, display, system, code: tuple(self._ingredients_of(
                [{"system": system, "code": code}], concept_text({"text": text, "coding": [{"display": display}]}))))
        self.procedure_words = [(word, cause.id) for cause in catalog.causes.values()
                                for word in cause.detect.get("procedure_text", ())]
        self._one_coding_matches = memo(
            lambda rt, system, code, text, display: self._concept_matches(
                rt, {"text": text, "coding": [{"system": system, "code": code, "display": display}]}))
        self._condition_text_matches = memo(self._text_matches)
        self._section_text_matches = memo(self._section_matches)
        self._fracture_text_site = memo(self._fracture_text)
        self._fracture_procedure_site = memo(self._fracture_procedure)
        self._text_certainty = memo(self._cue_kinds)
        self._result_name = memo(self._read_result_name)
        self.cond_suspected = set(st.get("condition_verification_suspected", []))
        cues = det.get("condition_text") or {}
        self.cue_kinds_before = {normalize_text(w): kind for kind, ws in cues.get("cues_before", {}).items() for w in ws}
        self.cue_kinds_after = {normalize_text(w): kind for kind, ws in cues.get("cues_after", {}).items() for w in ws}
        energy = det.get("fractures", {}).get("high_energy_words", [])
        self.high_energy_regex = words_regex(energy) if energy else None
        self._procedure_text_matches = memo(
            lambda low: tuple((cause_id, "trigger") for word, cause_id in self.procedure_words if word in low))
        # one reader per resource type, each over all resources of its type
        self._readers = {
            "Patient": self._each(self._patient),
            "Condition": self._each(self._condition),
            "Procedure": self._each(self._procedure),
            "Observation": self._observations,           # most of any chart: a loop of its own
            "MedicationRequest": self._each(self._medication),
            "MedicationStatement": self._each(self._medication),
            "MedicationAdministration": self._each(self._medication),
            "MedicationDispense": self._each(self._medication),      # pharmacy fills: often the best evidence of use
        }

    def build(self, prefetch: dict, patient_id: str, as_of: date, drafts: list[dict] = ()) -> PatientRecord:
        """One pass sorts the prefetch's resources by type; then each type is read in its own loop.
        Medications are gathered in the pass, so a record that points at one finds it wherever
        it was listed. A key whose Bundle carries an error OperationOutcome is noted in
        `failed_keys` (the caller fetches it from the FHIR server instead).

        `drafts`: MedicationRequests being ordered (order-select, order-sign), read as planned
        exposures from their start (today when they name none): `rec.planned`."""
        rec = PatientRecord(patient_id=patient_id, as_of=as_of, known_valid=self.known_valid,
                            read_from=self._cutoffs(as_of))
        batches: dict[str, list[dict]] = {rt: [] for rt in self._readers}
        medications: dict[str, dict] = {}
        others = 0                          # resources of types no rule reads
        for key, value in prefetch.items():
            if type(value) is not dict:
                continue
            if value.get("resourceType") == "Bundle":
                entries = value.get("entry")
                if type(entries) is not list:
                    continue
            else:
                entries = ({"resource": value},)
            for entry in entries:
                res = entry.get("resource") if type(entry) is dict else None
                if type(res) is not dict:
                    continue
                rt = res.get("resourceType")
                if type(rt) is not str:
                    continue                # not a FHIR resource at all
                batch = batches.get(rt)
                if batch is not None:
                    batch.append(res)
                elif rt == "OperationOutcome":
                    if key not in rec.failed_keys and is_error_outcome(res):
                        rec.failed_keys.append(key)
                else:
                    others += 1
                    if rt == "Medication" and type(res.get("id")) is str:
                        medications["Medication/" + res["id"]] = res    # for the records that point at it
        for rt, read in self._readers.items():
            if batches[rt]:
                read(rec, batches[rt], medications)
        for res in drafts:
            try:
                self._medication(rec, res, medications, planned=True)
            except _MALFORMED:
                rec.skipped_invalid += 1
        if rec.closed_concepts or rec.closed_causes or rec.refuted_causes:
            _reconcile(rec)
        if self.fill_gap_days:
            _bridge_fills(rec, self.fill_gap_days)
        rec.resources_seen = others + sum(map(len, batches.values()))
        for lst in rec.observations.values():
            lst.sort(key=_WHEN, reverse=True)
        if self.egfr_codes and self.creatinine_codes and any(rec.observations.get(c) for c in self.creatinine_codes):
            _computed_egfr(rec, self.egfr_codes, self.creatinine_codes)
        return rec

    @staticmethod
    def _each(handler):
        """A reader that hands each resource to `handler`; a malformed one is skipped and counted."""
        def read(rec: PatientRecord, resources: list[dict], medications: dict[str, dict]) -> None:
            for res in resources:
                try:
                    handler(rec, res, medications)
                except _MALFORMED:
                    rec.skipped_invalid += 1
        return read

    # ---- validation ------------------------------------------------------------------------
    @staticmethod
    def _keep(rec: PatientRecord, res: dict) -> str | None:
        """Remember a resource that can drive a finding; it is validated only if it does. None when
        it is kept already: the same resource listed under two prefetch keys counts once."""
        ref = reference_of(res)
        if ref in rec.raw and type(res.get("id")) is str:
            return None
        rec.raw[ref] = res
        return ref

    # ---- Patient -----------------------------------------------------------------------------
    def _patient(self, rec: PatientRecord, res: dict, _medications: dict) -> None:
        patient_id = rec.patient_id
        if rec.has_patient or (patient_id and res.get("id") not in (None, patient_id)):
            return
        ref = self._keep(rec, res)
        if ref is None:
            return                      # the same Patient again, found invalid the first time
        if not rec.validate(ref):
            rec.skipped_invalid += 1
            return
        rec.has_patient = True
        birth = res.get("birthDate")
        rec.birth_date = None if birth is None or _malformed_date(birth) else parse_date(birth)
        g = res.get("gender")
        rec.sex = g if g in ("male", "female") else None
        if res.get("deceasedBoolean") is True:
            rec.deceased = True
        elif isinstance(res.get("deceasedDateTime"), str):
            died = parse_date(res["deceasedDateTime"])
            if died is not None and died <= rec.as_of:     # a death recorded after "today" is not yet so
                rec.deceased, rec.deceased_on = True, died
