"""Fetches missing prefetch data from the EHR's FHIR server: in parallel, under one deadline.

The access token is sent only to the fhirServer the request named, only over https or to a
loopback address, and never logged. Redirects are not followed and `next` links must stay on
the same server, so the service cannot be steered into the network.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter

from .jsonutil import as_list

log = logging.getLogger(__name__)


class FhirError(Exception):
    """The FHIR server could not supply the data (the caller answers 412)."""


class FhirUnauthorized(FhirError):
    pass


class FhirTimeout(FhirError):
    pass


class FhirBadResponse(FhirError):
    pass


class FhirRefused(FhirError):
    """The request was not sent: unsafe server URL or token transport."""


@dataclass
class FetchStats:
    requests: int = 0
    bytes: int = 0


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class FhirClient:
    """One per process: a pooled HTTP session and a small thread pool for parallel queries."""

    def __init__(self, max_pages: int = 10, max_bytes: int = 20 * 1024 * 1024, max_workers: int = 16):
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        self.max_workers = max_workers
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # a session per thread: requests.Session is not documented as thread-safe
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=8, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.trust_env = False          # no proxies from the environment: talk to fhirServer only
            self._local.session = s
        return s

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="fhir")
            return self._pool

    @staticmethod
    def check_server(base: str, token: str | None) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FhirRefused("fhirServer is not an http(s) URL")
        if token and parts.scheme != "https" and not _is_loopback(parts.hostname):
            raise FhirRefused("an access token is only sent over https")

    def fetch_many(self, base: str, token: str | None, queries: dict[str, str], timeout: float,
                   stats: FetchStats) -> dict[str, dict]:
        """Run every query in parallel; all must succeed before `timeout` seconds, else FhirError."""
        self.check_server(base, token)
        deadline = time.monotonic() + timeout
        lock = threading.Lock()
        futures = {self._executor().submit(self._fetch, base, token, q, deadline, stats, lock): key
                   for key, q in queries.items()}
        done, pending = wait(futures, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        results: dict[str, dict] = {}
        for f in done:
            exc = f.exception()
            if exc is not None:
                raise exc if isinstance(exc, FhirError) else FhirBadResponse(type(exc).__name__)
            results[futures[f]] = f.result()
        if pending:
            raise FhirTimeout(f"FHIR server did not answer within {timeout:g} s")
        return results

    def follow_next(self, base: str, token: str | None, bundle: dict, timeout: float, stats: FetchStats) -> dict:
        """Complete a paginated prefetch Bundle by following its `next` links."""
        self.check_server(base, token)
        deadline = time.monotonic() + timeout
        return self._pages(base, token, bundle, deadline, stats, threading.Lock())

    # ------------------------------------------------------------------------------------------
    def _fetch(self, base: str, token: str | None, query: str, deadline: float, stats: FetchStats, lock) -> dict:
        url = base.rstrip("/") + "/" + query.lstrip("/")
        first = self._get(url, token, deadline, stats, lock)
        if first.get("resourceType") == "Bundle":
            return self._pages(base, token, first, deadline, stats, lock)
        return first

    def _pages(self, base: str, token: str | None, bundle: dict, deadline: float, stats: FetchStats, lock) -> dict:
        entries = list(as_list(bundle.get("entry")))
        page, pages = bundle, 1
        root = base.rstrip("/") + "/"
        while True:
            nxt = next((l.get("url") for l in as_list(page.get("link"))
                        if isinstance(l, dict) and l.get("relation") == "next" and isinstance(l.get("url"), str)), None)
            if not nxt:
                break
            if pages >= self.max_pages:
                log.warning("fhir pagination cap reached", extra={"event": "fhir_page_cap", "pages": pages})
                break
            if not nxt.startswith(root):
                raise FhirRefused("a next link points off the FHIR server")
            page = self._get(nxt, token, deadline, stats, lock)
            if page.get("resourceType") != "Bundle":
                raise FhirBadResponse("a next page is not a Bundle")
            entries += as_list(page.get("entry"))
            pages += 1
        merged = {k: v for k, v in bundle.items() if k not in ("entry", "link")}
        merged["entry"] = entries
        return merged

    def _get(self, url: str, token: str | None, deadline: float, stats: FetchStats, lock) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FhirTimeout("deadline passed")
        headers = {"Accept": "application/fhir+json, application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            with self._session().get(url, headers=headers, timeout=(min(remaining, 2.0), remaining),
                                     allow_redirects=False, stream=True) as resp:
                with lock:
                    stats.requests += 1
                if resp.status_code in (401, 403):
                    raise FhirUnauthorized(f"FHIR server answered {resp.status_code}")
                if resp.status_code != 200:
                    raise FhirBadResponse(f"FHIR server answered {resp.status_code}")
                body = bytearray()
                for chunk in resp.iter_content(65536):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise FhirBadResponse("FHIR response too large")
                    if time.monotonic() > deadline:
                        raise FhirTimeout("deadline passed while reading")
                with lock:
                    stats.bytes += len(body)
        except requests.Timeout as exc:
            raise FhirTimeout("FHIR server timed out") from exc
        except requests.RequestException as exc:
            raise FhirBadResponse(f"FHIR server unreachable ({type(exc).__name__})") from exc
        try:
            data = orjson.loads(bytes(body))
        except orjson.JSONDecodeError as exc:
            raise FhirBadResponse("FHIR server sent a body that is not JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            raise FhirBadResponse("FHIR server sent something that is not a FHIR resource")
        if data["resourceType"] == "OperationOutcome":
            raise FhirBadResponse("FHIR server answered with an OperationOutcome")
        return data
