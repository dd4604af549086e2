"""The patient record: the prefetched FHIR resources, read against the catalog into a PatientRecord.

Raw JSON is scanned cheaply against the catalog's code indexes first; only resources that can drive a finding or
card context are validated with fhir.resources (R4B models). A resource that fails validation is skipped and
counted, never fatal. One module per kind of resource (conditions and procedures, observations, medications), the
record and its value types in `values`, typing in `validation`; `builder` sorts a prefetch by type and dispatches.
"""
from .builder import MEMO_SIZE, RecordBuilder, reference_of
from .conditions import ENCOUNTER_DIAGNOSIS, status_code
from .validation import MAX_YEAR, MIN_YEAR, TYPED, ValidatedResources, parse_date, warm_models, without_malformed_dates
from .values import (MAX_CODE_CHARS, MAX_COVER_DAYS, MAX_DOSE_MG, MAX_LABEL_CHARS, MAX_PER_DAY, MAX_TEXT_CHARS,
                     CodedEntry, ComputedEgfr, Measurement, MedicationExposure, PatientRecord, ckd_epi_2021, codings,
                     concept_label, concept_text, covered_days, num)

__all__ = ["MEMO_SIZE", "RecordBuilder", "reference_of", "ENCOUNTER_DIAGNOSIS", "status_code", "MAX_YEAR", "MIN_YEAR",
           "TYPED", "ValidatedResources", "parse_date", "warm_models", "without_malformed_dates", "MAX_CODE_CHARS",
           "MAX_COVER_DAYS", "MAX_DOSE_MG", "MAX_LABEL_CHARS", "MAX_PER_DAY", "MAX_TEXT_CHARS", "CodedEntry",
           "ComputedEgfr", "Measurement", "MedicationExposure", "PatientRecord", "ckd_epi_2021", "codings",
           "concept_label", "concept_text", "covered_days", "num"]
