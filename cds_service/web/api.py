"""HTTP endpoints: discovery, the patient-view service, feedback, health; errors as OperationOutcome."""
from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import orjson
from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge as PayloadTooLarge, RequestTimeout

from .. import metrics
from .auth import AuthError
from ..errors import BadRequest, ServiceError, TooManyRequests, operation_outcome
from ..storage.feedback import StoreUnavailable, normalize_feedback

log = logging.getLogger(__name__)
bp = Blueprint("cds", __name__)

CORS_HEADERS = "Authorization, Content-Type, Accept"
CORS_METHODS = "GET, POST, OPTIONS"


def json_response(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


UNAUTHENTICATED = {"/healthz", "/readyz", "/metrics"}
# a UUID or a 16-64 digit hex trace id with a letter in it: the shapes tracing systems send, never a bare number
_SAFE_REQUEST_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
                              r"|(?=[0-9]*[a-fA-F])[0-9a-fA-F]{16,64}")


def _cds() -> dict:
    return current_app.extensions["cds"]


def _audiences() -> list[str]:
    """The URL that was called (as the client sees it), the JWT's required `aud`."""
    base = _cds()["settings"].public_base_url.rstrip("/") or request.host_url.rstrip("/")
    url = base + request.path
    out = [url]
    typed = request.environ.get("cds.path_as_sent")
    if typed and typed != request.path:
        out.append(base + typed)                  # the URL exactly as the client called it ("//" included)
    if url.endswith("/feedback"):
        out.append(url[: -len("/feedback")])      # some clients sign feedback with the service URL
    return out


def _read_json() -> object:
    """The body as JSON, strictly: orjson refuses NaN, Infinity, numbers that overflow to infinity and
    lone UTF-16 surrogates, so nothing non-finite or unencodable reaches the engine or the logs. A body
    longer than the limit is refused whether or not it declared its length (chunked uploads too)."""
    ctype = (request.mimetype or "").lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise BadRequest("The body must be JSON (Content-Type: application/json).")
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge()
    # read the body ourselves, one byte past the limit (a chunked upload over it is refused, never cut
    # and parsed) and within BODY_DEADLINE_S in all (a client trickling its body cannot hold the thread)
    chunked = request.content_length is None
    stream = request.environ["wsgi.input"] if chunked else request.stream
    want = (limit + 1) if limit else (request.content_length or 0) if not chunked else 1 << 30
    try:
        raw = _read_up_to(stream, want, time.monotonic() + BODY_DEADLINE_S)
    except OSError:
        raise RequestTimeout() from None
    if limit and len(raw) > limit:
        raise PayloadTooLarge()
    if not raw:
        raise BadRequest("The request body is empty.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        where = str(exc).rsplit(": line ", 1)
        position = f" (line {where[1]})" if len(where) == 2 else ""
        raise BadRequest(f"The request body is not valid JSON{position}: numbers must be finite and strings "
                         "valid Unicode.") from None


BODY_DEADLINE_S = 30.0


def _read_up_to(stream, n: int, deadline: float) -> bytes:
    parts, got = [], 0
    while got < n:
        if time.monotonic() > deadline:
            raise TimeoutError("request body not received in time")
        chunk = stream.read(min(65536, n - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


@bp.get("/cds-services")
def discovery():
    return json_response(_cds()["services"].discovery())


def _service(service_id: str):
    """The registered service with this id (404 otherwise); its id labels the request's metrics and log."""
    service = _cds()["services"].get(service_id)
    g.service_id = service.id
    return service


@bp.post("/cds-services/<service_id>")
def invoke(service_id: str):
    service = _service(service_id)
    body = _read_json()
    cds = _cds()
    g.hook = body.get("hook") if isinstance(body, dict) and isinstance(body.get("hook"), str) else None
    result = service.invoke(body, cds["settings"].evaluation_date())
    g.timings.update(result.timings)
    client = _client_id()
    for card in result.response["cards"]:
        card["uuid"] = cds["card_ids"].new(client=client)     # proves its issue (to this client): nothing is written
    snoozing = bool(cds.get("snooze")) and service.snoozable
    snoozed = cds["snooze"].apply(result.response, body.get("fhirServer") or "", result.assessment,
                                  client=client) if snoozing else False
    if result.response["cards"]:
        _forget_old_notes()
    for card in result.response["cards"]:
        metrics.CARDS.labels(service.id, card["indicator"]).inc()
    g.counts = {"resources": result.assessment.record.resources_seen,
                "skipped_invalid": result.assessment.record.skipped_invalid,
                "skipped_implausible": result.assessment.record.skipped_implausible,
                "malformed_dates": result.assessment.record.malformed_dates,
                "superseded_conditions": result.assessment.record.superseded,
                "findings": len(result.assessment.findings), "cards": len(result.response["cards"]),
                "fhir_keys_fetched": len(result.prefetch.fetched_keys),
                "fhir_requests": result.prefetch.stats.requests, "snoozed": int(snoozed)}
    return json_response(result.response)


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str):
    service_id = _service(service_id).id
    _feedback_rate().take(_client_id() or request.remote_addr or "")
    entries = normalize_feedback(_read_json())
    for e in entries:
        metrics.FEEDBACK.labels(e["outcome"]).inc()
    store = _cds()["feedback"]
    days = _cds()["settings"].feedback_days
    now = datetime.now(timezone.utc)
    window = (now - timedelta(days=days), now + timedelta(minutes=5))
    stamped = {e["card"] for e in entries if _issued_within(e["card"], window)}
    try:
        # cards stamped by this service prove their own issue; others (issued before the stamps) by their notes
        others = sorted({e["card"] for e in entries} - stamped)
        issued = stamped | (store.call("issued_since", others, window[0].isoformat()) if others else set())
        known = [e for e in entries if e["card"] in issued]
        stored = store.save(service_id, known) if known else 0
    except StoreUnavailable as exc:
        log.warning("feedback store unavailable", extra={"event": "store_unavailable", "error": str(exc),
                                                         "request_id": g.get("request_id")})
        # a save past its deadline may still commit: say so; a retry is safe (each entry is stored once)
        resp = json_response(operation_outcome("The feedback store did not confirm in time: the feedback may not "
                                               "have been stored. Retry it; a retry is never stored twice.",
                                               "transient"), 503)
        resp.headers["Retry-After"] = "5"
        return resp
    unknown = len(entries) - len(known)
    if unknown:
        # anyone holding a trusted JWT could write rows for cards that never existed: refuse them
        log.warning("feedback for cards this service did not issue", extra={
            "event": "feedback_unknown_card", "entries": unknown, "request_id": g.get("request_id")})
    if not known:
        g.counts = {"feedback_entries": len(entries), "feedback_unknown": unknown}
        return json_response(operation_outcome(f"No card with that uuid was issued by this service in the last "
                                               f"{days} days; nothing was stored.", "not-found"), 404)
    snoozes = 0
    if _cds().get("snooze"):
        _cds()["behind"].drain(0.5)                # this worker's notes of just-issued cards, written first
        try:
            snoozes = _cds()["snooze"].on_feedback(known)
        except StoreUnavailable:                   # feedback is stored; the snooze is best effort
            log.warning("snooze not set: store unavailable", extra={"event": "snooze_store_error"})
    g.counts = {"feedback_entries": len(entries), "feedback_new": stored, "feedback_unknown": unknown,
                "snoozes_set": snoozes}
    return json_response({"stored": stored, "received": len(entries), **({"unknown": unknown} if unknown else {})})


class RateLimit:
    """A token bucket per client (its JWT issuer, else its address), per worker: `rate` requests a minute with
    bursts of `burst`. Feedback is a few clicks a minute per clinician; a client posting thousands is refused
    with 429 before its body is read."""

    def __init__(self, per_minute: int, burst: int):
        self.rate, self.burst = per_minute / 60.0, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                raise TooManyRequests("Too much feedback from this client: retry in a moment.",
                                      retry_after=max(1, int((1 - tokens) / self.rate) + 1))
            self._buckets[client] = (tokens - 1, now)
            if len(self._buckets) > 10_000:          # bounded: the oldest clients are forgotten
                for key in list(self._buckets)[:1000]:
                    del self._buckets[key]


def _feedback_rate() -> RateLimit:
    """This app's feedback rate limit (CDS_FEEDBACK_PER_MINUTE, bursts of a fifth), made on first use."""
    rate = _cds().get("feedback_rate")
    if rate is None:
        per_minute = _cds()["settings"].feedback_per_minute
        rate = _cds().setdefault("feedback_rate", RateLimit(per_minute, max(1, per_minute // 5)))
    return rate


def _client_id() -> str:
    """The authenticated client (its JWT issuer), or "" with authentication off."""
    return str((g.get("client") or {}).get("iss") or "")


def _issued_within(card_uuid: str, window: tuple[datetime, datetime]) -> bool:
    at = _cds()["card_ids"].issued_at(card_uuid, _client_id())
    return at is not None and window[0] <= at <= window[1]


def _forget_old_notes() -> None:
    """Every PRUNE_EVERY cards issued, drop the snooze notes of cards older than the feedback window (feedback on
    them is refused anyway, and the table does not grow for ever): behind the response, never on the card path."""
    if next(_issued_count) % PRUNE_EVERY:
        return
    before = datetime.now(timezone.utc) - timedelta(days=_cds()["settings"].feedback_days + 1)
    store = _cds()["feedback"]
    _cds()["behind"].submit(lambda: store.call("forget_issued_before", before.isoformat(), timeout=5.0),
                            "prune old card notes")


PRUNE_EVERY = 1000
_issued_count = itertools.count(1)


bench_bp = Blueprint("bench", __name__)


@bench_bp.post("/cds-services/_parse-only")
def parse_only():
    """The benchmark's floor: receive and parse the body, answer with no cards."""
    _read_json()
    return json_response({"cards": []})


@bp.get("/metrics")
def prometheus_metrics():
    return Response(metrics.render(), mimetype=metrics.CONTENT_TYPE.split(";")[0],
                    headers={"Content-Type": metrics.CONTENT_TYPE})


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers. Touches nothing outside it."""
    return json_response({"status": "ok", "catalog_version": _cds()["catalog"].version})


@bp.get("/readyz")
def readyz():
    """Readiness: the feedback store answers within a second (and the service is not shutting down)."""
    if _cds().get("draining"):
        return json_response({"status": "shutting-down"}, 503)
    try:
        _cds()["feedback"].call("ping", timeout=1.0)
    except StoreUnavailable:
        return json_response({"status": "unavailable", "store": "unavailable"}, 503)
    return json_response({"status": "ready", "store": "ok", "catalog_version": _cds()["catalog"].version})


class SlashTolerant:
    """WSGI middleware: `/cds-services/` and `/cds-services//secondary-osteoporosis` (a discovery URL typed
    with a trailing slash, then joined with the service id) reach the same routes as without the extra
    slashes, instead of a 404 or Werkzeug's 308 HTML page."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if "//" in path or (path.endswith("/") and len(path) > 1):
            environ["cds.path_as_sent"] = path
            tidy = re.sub("/{2,}", "/", path)
            environ["PATH_INFO"] = tidy.rstrip("/") or "/"
        return self.app(environ, start_response)


def install_handlers(app: Flask) -> None:
    @app.before_request
    def _start():
        # a caller's id is kept only when it looks like a trace id (it could otherwise carry an MRN)
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.timings, g.counts, g.hook = {}, {}, None
        g.service_id = ""
        if request.method == "OPTIONS":
            # CORS preflight: answered here, never needs a JWT
            return Response(status=204)
        authenticator = _cds()["authenticator"]
        if authenticator is not None and request.path not in UNAUTHENTICATED:
            start = time.perf_counter()
            try:
                claims = authenticator.authenticate(request.headers.get("Authorization"), _audiences())
                g.client = {"iss": claims.get("iss"), "tenant": claims.get("tenant")}
            except AuthError as exc:
                log.warning("client authentication failed", extra={"event": "auth_failed", "reason": str(exc),
                                                                   "request_id": g.request_id})
                resp = json_response(operation_outcome("Authentication failed.", "login"), 401)
                resp.headers["WWW-Authenticate"] = 'Bearer realm="cds-services", error="invalid_token"'
                return resp
            finally:
                g.timings["auth_ms"] = round((time.perf_counter() - start) * 1000, 2)

    @app.after_request
    def _finish(resp: Response):
        origins = _cds()["settings"].cors_origins
        origin = request.headers.get("Origin")
        if origins.strip() == "*":
            resp.headers["Access-Control-Allow-Origin"] = "*"
        elif origin and origin in {o.strip() for o in origins.split(",")}:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
        if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true" \
                and "Access-Control-Allow-Origin" in resp.headers:
            # Chromium's private-network preflight: a hosted https sandbox calling a service on localhost
            resp.headers["Access-Control-Allow-Private-Network"] = "true"
        if "Access-Control-Allow-Origin" in resp.headers:            # CORS only for the configured origins
            resp.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            resp.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            resp.headers["Access-Control-Max-Age"] = "600"
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        resp.headers["Cache-Control"] = "no-store"
        if request.method != "OPTIONS":
            label = metrics.endpoint_label(request.url_rule.rule if request.url_rule else None)
            elapsed = time.perf_counter() - g.get("started", time.perf_counter())
            service_id = g.get("service_id") or ("unknown" if label in ("service", "feedback") else "")
            metrics.REQUESTS.labels(label, str(resp.status_code), service_id).inc()
            metrics.LATENCY.labels(label, str(resp.status_code), service_id).observe(elapsed)
            log.info("request", extra={
                "event": "request", "request_id": g.get("request_id"), "method": request.method,
                "route": request.url_rule.rule if request.url_rule else "unmatched", "service": label,
                "service_id": service_id or None, "hook": g.get("hook"),
                "status": resp.status_code,
                "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
                **g.get("timings", {}), **g.get("counts", {})})
        return resp

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        resp = json_response(operation_outcome(exc.diagnostics, exc.code), exc.status)
        if isinstance(exc, TooManyRequests):
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {404: "not-found", 405: "not-supported", 408: "timeout", 413: "too-costly"}.get(exc.code or 400, "invalid")
        text = {404: "Not found.", 405: "Method not allowed.", 408: "The request body was not received in time.",
                413: "The request body is larger than this service accepts."}.get(exc.code or 400, exc.name)
        resp = json_response(operation_outcome(text, code), exc.code or 400)
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # Last resort: never a stack trace or request data in the body or the log.
        log.error("unhandled error", extra={"event": "error", "request_id": g.get("request_id"),
                                            "error": type(exc).__name__})
        return json_response(operation_outcome("The service could not process this request.", "exception"), 500)
