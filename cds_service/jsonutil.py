"""Reading untrusted JSON: FHIR from EHRs and clients may carry any type in any member."""
from __future__ import annotations

from typing import Any


def as_list(value: Any) -> list:
    """The value when it is a JSON array, else an empty list (never iterate what you did not check)."""
    return value if isinstance(value, list) else []


def is_error_outcome(resource: dict) -> bool:
    """An OperationOutcome with an error or fatal issue: the server could not answer (a search
    Bundle may carry one as an entry, beside or instead of the matches)."""
    return resource.get("resourceType") == "OperationOutcome" and any(
        isinstance(i, dict) and i.get("severity") in ("error", "fatal") for i in as_list(resource.get("issue")))
