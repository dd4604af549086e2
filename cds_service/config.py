"""Settings from the environment (CDS_ prefix), with defaults that run locally as-is."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """Every setting; each field reads the environment variable CDS_<FIELD NAME IN CAPITALS>."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = field(default_factory=_cores)
    threads: int = 4
    data_dir: str = "data"
    database_url: str = ""                 # default: sqlite:///<data_dir>/feedback.sqlite3
    cards_dir: str = ""                    # default: the cards/ folder shipped with the service
    fhir_timeout: float = 3.0              # one overall deadline for all FHIR fallback queries (s)
    fhir_max_pages: int = 10               # `next` links followed per prefetch key
    fhir_max_bytes: int = 20 * 1024 * 1024  # largest FHIR response read
    fhir_page_size: int = 200              # _count in the prefetch templates
    fhir_allowlist: str = ""               # comma-separated fhirServer URL prefixes; empty: any server
    max_body_bytes: int = 10 * 1024 * 1024
    shed_after: float = 10.0               # a request that waited this many seconds for a thread: 503 at once
    max_requests: int = 20000              # a worker is replaced after this many requests (plus up to a quarter)
    cors_origins: str = ""                 # "*" or a comma-separated list of allowed origins; empty: no CORS
    as_of: str = ""                        # fixed evaluation date (YYYY-MM-DD); default: today
    log_level: str = "INFO"
    bench_endpoint: bool = False           # adds POST /cds-services/_parse-only (benchmark floor)
    auth: str = "required"                 # required | off (off only when asked for: local testing)
    trusted_issuers: str = ""              # JSON: issuer -> JWKS URL (or list of allowed JWKS URLs)
    public_base_url: str = ""              # e.g. https://cds.example.org (the JWT aud behind a proxy)
    snooze: str = "on"                     # on | off: a card overridden or acted on stays away for that patient
    snooze_secrets: str = ""               # comma-separated HMAC secrets, current first; empty: one kept in the store
    snooze_days: int = 182                 # how long an overridden or accepted card stays away
    feedback_days: int = 30                # feedback is taken for cards issued within this many days
    feedback_per_minute: int = 600         # feedback posts a minute per client and worker (bursts of a fifth)

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            raw = env.get(f"CDS_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls(), f.name))
            try:
                if kind is bool:
                    if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                    continue
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"CDS_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(**values)
        if s.auth == "auto":
            raise ValueError("CDS_AUTH=auto is gone (it switched authentication off behind a proxy on the same host): "
                             "set CDS_AUTH=required, or CDS_AUTH=off for local testing")
        if s.auth not in ("required", "off"):
            raise ValueError("CDS_AUTH must be required or off")
        if s.auth == "off" and (s.trusted_issuers.strip() or s.public_base_url.strip()):
            raise ValueError("CDS_AUTH=off with CDS_TRUSTED_ISSUERS or CDS_PUBLIC_BASE_URL set: that is a production "
                             "configuration with authentication off; set CDS_AUTH=required (or unset them to test locally)")
        if s.snooze not in ("on", "off"):
            raise ValueError("CDS_SNOOZE must be on or off")
        if s.as_of:
            try:
                date.fromisoformat(s.as_of)   # fail at start-up, not per request
            except ValueError:
                raise ValueError(f"CDS_AS_OF={s.as_of!r} is not a date (YYYY-MM-DD)") from None
        if not 1 <= s.port <= 65535:
            raise ValueError(f"the port must be 1-65535 (CDS_PORT or --port), not {s.port}")
        if not s.shed_after > 0:
            raise ValueError("CDS_SHED_AFTER must be a positive number of seconds")
        if s.max_requests < 0:
            raise ValueError("CDS_MAX_REQUESTS must be 0 (workers never replaced) or a positive number of requests")
        if s.workers < 1 or s.threads < 1:
            raise ValueError("CDS_WORKERS and CDS_THREADS must be at least 1")
        if any(len(secret) < MIN_SECRET_CHARS for secret in s.snooze_secret_list):
            raise ValueError(f"every CDS_SNOOZE_SECRETS secret needs at least {MIN_SECRET_CHARS} characters "
                             "(e.g. python3 -c 'import secrets; print(secrets.token_hex(32))')")
        if s.snooze_days <= 0:
            raise ValueError("CDS_SNOOZE_DAYS must be a positive number of days")
        if s.feedback_per_minute <= 0:
            raise ValueError("CDS_FEEDBACK_PER_MINUTE must be a positive number")
        if s.feedback_days <= 0:
            raise ValueError("CDS_FEEDBACK_DAYS must be a positive number of days")
        return s

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'feedback.sqlite3'}"

    @property
    def fhir_allowlist_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.fhir_allowlist.split(",") if p.strip())

    @property
    def snooze_secret_list(self) -> list[str]:
        return [x.strip() for x in self.snooze_secrets.split(",") if x.strip()]

    @property
    def auth_required(self) -> bool:
        return self.auth != "off"

    def evaluation_date(self) -> date:
        return date.fromisoformat(self.as_of) if self.as_of else date.today()


MIN_SECRET_CHARS = 32          # an HMAC key guessed offline from the card-to-patient links must not be short


ENV_DOC = {
    "host": "Address the server binds to",
    "port": "TCP port",
    "workers": "WSGI worker processes (default: the number of cores)",
    "threads": "Threads per worker",
    "data_dir": "Folder for the embedded SQLite feedback database",
    "database_url": "Feedback store URL (sqlite:///path); default sqlite in CDS_DATA_DIR",
    "cards_dir": "Folder holding the clinical catalog (default: the cards/ shipped with the service)",
    "fhir_timeout": "Overall deadline in seconds for FHIR fallback queries",
    "fhir_max_pages": "Pages (`next` links) followed per prefetch key",
    "fhir_max_bytes": "Largest FHIR response body read, in bytes",
    "fhir_page_size": "_count used in prefetch templates",
    "fhir_allowlist": "Comma-separated URL prefixes of FHIR servers the fallback may contact (empty: any)",
    "max_body_bytes": "Largest request body accepted, in bytes (larger: 413)",
    "shed_after": "Seconds a request may wait for a worker thread before it is answered 503 with Retry-After (its "
                  "client has given up); a backlog over 16 waiting requests per thread is answered 503 at once",
    "max_requests": "Requests after which a worker is replaced, at a staggered point (plus up to a quarter more), to "
                    "give back a burst's memory; 0: never",
    "cors_origins": "Allowed CORS origins (browser clients such as the CDS Hooks sandbox): * or a comma-separated "
                    "list; empty (the default): no CORS headers",
    "as_of": "Fixed evaluation date YYYY-MM-DD (default: today)",
    "log_level": "Log level",
    "auth": "Client JWT authentication: required (the default) or off (local testing only; refused with trusted "
            "issuers or a public URL configured)",
    "trusted_issuers": "JSON object: trusted JWT issuer -> JWKS URL (or list of allowed JWKS URLs for jku)",
    "public_base_url": "The service's public base URL, used as the expected JWT aud behind a proxy",
    "snooze": "on (default) or off: a card the clinician overrode or acted on stays away for that patient for "
              "CDS_SNOOZE_DAYS unless something new appears",
    "snooze_secrets": "Comma-separated secrets (current first, older ones still read) keying the card-to-patient link "
                      "for snooze; empty: a random secret generated once and kept in the feedback store (shared by "
                      "every worker and replica on that store)",
    "snooze_days": "Days an overridden or accepted card stays away for that patient (unless something new appears)",
    "feedback_days": "Days after a card is issued during which feedback on it is accepted (feedback for a card this "
                     "service did not issue, or issued earlier, is refused with 404)",
    "feedback_per_minute": "Feedback posts a minute per client (JWT issuer, else address) and worker, in bursts of a "
                           "fifth of it; more: 429 with Retry-After",
    "bench_endpoint": "Add POST /cds-services/_parse-only, the benchmark's parse-and-return-nothing floor",
}
