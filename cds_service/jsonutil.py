"""Reading untrusted JSON: FHIR from EHRs and clients may carry any type in any member."""
from __future__ import annotations

from typing import Any


def as_list(value: Any) -> list:
    """The value when it is a JSON array, else an empty list (never iterate what you did not check)."""
    return value if isinstance(value, list) else []
