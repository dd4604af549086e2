"""Typed errors that map to HTTP answers, each with a FHIR OperationOutcome body."""
from __future__ import annotations


class ServiceError(Exception):
    """An error the client must see as a 4xx with an OperationOutcome."""

    status = 400
    code = "invalid"

    def __init__(self, diagnostics: str):
        super().__init__(diagnostics)
        self.diagnostics = diagnostics


class BadRequest(ServiceError):
    status, code = 400, "invalid"


class NotFound(ServiceError):
    status, code = 404, "not-found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "not-supported"


class PayloadTooLarge(ServiceError):
    status, code = 413, "too-costly"


class TooManyRequests(ServiceError):
    """A client over its feedback rate: 429 with Retry-After."""
    status, code = 429, "throttled"
    retry_after = 1

    def __init__(self, diagnostics: str, retry_after: int = 1):
        super().__init__(diagnostics)
        self.retry_after = retry_after


class PrefetchUnavailable(ServiceError):
    """Data a rule needs is missing from prefetch and the FHIR server could not supply it (412)."""

    status, code = 412, "not-found"


def operation_outcome(diagnostics: str, code: str = "invalid", severity: str = "error") -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}
