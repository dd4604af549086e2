"""The clinical catalog in cards/: loaded once, validated loudly, indexed for the hot path.

Everything clinical (causes, codes, thresholds, wording) lives in YAML so that a reviewer can change it without
touching Python. This module is the catalog's public face; the work is done in four: `model` (the Catalog the
engine reads), `loading` (YAML, schema, the cached load), `checks` (cross-references and templates, every problem
with file and line) and `indexes` (the lookups of the hot path). None of them decides anything clinical.
"""
from .codesets import icd_key
from .loading import DEFAULT_CARDS_DIR, FILES, load_catalog, reuse_validated_files, validated_files
from .model import (ATC, CPT, ICD9CM, ICD10CM, ICD10PCS, ICD_MAX_KEY, KNOWN_SYSTEMS, LOINC, RXNORM, SNOMED,
                    SYSTEM_ALIASES, Catalog, CatalogError, Cause, Ingredient, icd_prefix_match, normalize_system,
                    normalize_text, words_regex)

__all__ = ["icd_key", "DEFAULT_CARDS_DIR", "FILES", "load_catalog", "reuse_validated_files", "validated_files",
           "ATC", "CPT", "ICD9CM", "ICD10CM", "ICD10PCS",
           "ICD_MAX_KEY", "KNOWN_SYSTEMS", "LOINC", "RXNORM", "SNOMED", "SYSTEM_ALIASES", "Catalog", "CatalogError",
           "Cause", "Ingredient", "icd_prefix_match", "normalize_system", "normalize_text", "words_regex"]
