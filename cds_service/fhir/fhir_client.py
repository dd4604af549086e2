"""Fetches missing prefetch data from the EHR's FHIR server: in parallel, under one deadline.

The access token is sent only to the fhirServer the request named, only over https or to a
loopback address, and never logged. Redirects are not followed and `next` links must stay on
the same server, so the service cannot be steered into the network.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter

from ..jsonutil import as_list

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


class _Exchange:
    """One request's conversation with a FHIR server: its own connections, so that when its deadline
    passes every socket it opened is shut down, and a server that trickles bytes (or never answers)
    cannot hold a thread a moment longer."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.session = requests.Session()
        self.session.trust_env = False         # no proxies from the environment: talk to fhirServer only
        exchange = self

        def tracked(base):
            class Tracked(base):
                def _new_conn(self):
                    sock = super()._new_conn()
                    with exchange.lock:
                        if exchange.closed:
                            sock.close()
                            raise OSError("deadline passed")
                        exchange.sockets.append(sock)
                    return sock
            return Tracked

        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=8, max_retries=0)
        pools = adapter.poolmanager.pool_classes_by_scheme
        pools = {"http": type("P", (pools["http"],), {"ConnectionCls": tracked(pools["http"].ConnectionCls)}),
                 "https": type("PS", (pools["https"],), {"ConnectionCls": tracked(pools["https"].ConnectionCls)})}
        adapter.poolmanager.pool_classes_by_scheme = pools
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        """Shut every socket down (a blocked read in another thread returns at once), then close."""
        with self.lock:
            self.closed = True
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.session.close()


class FhirClient:
    """One per process: a thread pool for parallel queries, a cap on how many run at once for all
    requests together (a request over the cap fails fast instead of queueing behind slow servers),
    and per request one exchange whose sockets are shut down at its deadline."""

    def __init__(self, max_pages: int = 10, max_bytes: int = 20 * 1024 * 1024, max_workers: int = 64,
                 per_server: int = 32):
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        self.max_workers = max_workers
        self.per_server = per_server
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_workers)
        self._server_slots: dict[str, threading.BoundedSemaphore] = {}
        # all fallback bodies being read at once share one budget: hostile servers streaming without
        # end cannot together drive a worker's memory past it
        self.budget_bytes = max(64 * 1024 * 1024, 2 * max_bytes)
        self._in_flight = 0
        self._budget_lock = threading.Lock()

    def _server_slot(self, base: str) -> threading.BoundedSemaphore:
        """Each FHIR server (scheme, host, port) has its own share of the threads: a slow one can use up
        only its own, never those of the servers other requests name."""
        key = urlsplit(base)._replace(path="", query="", fragment="").geturl().lower()
        with self._pool_lock:
            sem = self._server_slots.get(key)
            if sem is None:
                if len(self._server_slots) > 1000:             # bounded: forget idle servers
                    self._server_slots.clear()
                sem = self._server_slots[key] = threading.BoundedSemaphore(self.per_server)
            return sem

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
        """Run the queries in parallel (one thread each, from a capped pool); all must succeed before
        `timeout` seconds of wall-clock time, else FhirError. At the deadline every connection of
        this request is shut down, so no thread outlives it."""
        self.check_server(base, token)
        deadline = time.monotonic() + timeout
        lock = threading.Lock()
        exchange = _Exchange()
        server = self._server_slot(base)
        taken = 0
        try:
            items = list(queries.items())          # one per prefetch key the catalog names: a fixed, small number
            for _ in items:                        # wait for a thread, but never past this request's deadline
                if not server.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise FhirTimeout("this FHIR server's share of threads stayed busy until the deadline")
                if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    server.release()
                    raise FhirTimeout("the FHIR fallback stayed at capacity until the deadline")
                taken += 1
            futures = {self._executor().submit(self._slot(self._fetch, server), exchange, base, token, q, deadline,
                                               stats, lock): key for key, q in items}
            taken = 0                              # each task gives its slot back
            done, pending = wait(futures, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_EXCEPTION)
            results: dict[str, dict] = {}
            for f in done:
                exc = f.exception()
                if exc is not None:
                    raise exc if isinstance(exc, FhirError) else FhirBadResponse(type(exc).__name__)
                results[futures[f]] = f.result()
            if pending:
                raise FhirTimeout(f"FHIR server did not answer within {timeout:g} s")
            return results
        finally:
            for _ in range(taken):
                self._slots.release()
                server.release()                   # the semaphore acquired, even if the table was reset since
            exchange.close()                       # whatever is still reading stops now

    def _slot(self, fn, server: threading.BoundedSemaphore):
        def run(*args):
            try:
                return fn(*args)
            finally:
                self._slots.release()
                server.release()
        return run

    def follow_next(self, base: str, token: str | None, bundle: dict, timeout: float, stats: FetchStats) -> dict:
        """Complete a paginated prefetch Bundle by following its `next` links."""
        self.check_server(base, token)
        deadline = time.monotonic() + timeout
        exchange = _Exchange()
        timer = threading.Timer(max(0.0, timeout), exchange.close)
        timer.daemon = True
        timer.start()
        try:
            return self._pages(exchange, base, token, bundle, deadline, stats, threading.Lock())
        finally:
            timer.cancel()
            exchange.close()

    # ------------------------------------------------------------------------------------------
    def _fetch(self, exchange: _Exchange, base: str, token: str | None, query: str, deadline: float,
               stats: FetchStats, lock) -> dict:
        url = base.rstrip("/") + "/" + query.lstrip("/")
        first = self._get(exchange, url, token, deadline, stats, lock)
        if first.get("resourceType") == "Bundle":
            return self._pages(exchange, base, token, first, deadline, stats, lock)
        return first

    def _pages(self, exchange: _Exchange, base: str, token: str | None, bundle: dict, deadline: float,
               stats: FetchStats, lock) -> dict:
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
            page = self._get(exchange, nxt, token, deadline, stats, lock)
            if page.get("resourceType") != "Bundle":
                raise FhirBadResponse("a next page is not a Bundle")
            entries += as_list(page.get("entry"))
            pages += 1
        merged = {k: v for k, v in bundle.items() if k not in ("entry", "link")}
        merged["entry"] = entries
        return merged

    def _reserve(self, n: int) -> None:
        with self._budget_lock:
            if self._in_flight + n > self.budget_bytes:
                raise FhirBadResponse("the fallback's memory budget is in use by other responses")
            self._in_flight += n

    def _release(self, n: int) -> None:
        with self._budget_lock:
            self._in_flight -= n

    def _get(self, exchange: _Exchange, url: str, token: str | None, deadline: float, stats: FetchStats, lock) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FhirTimeout("deadline passed")
        headers = {"Accept": "application/fhir+json, application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            with exchange.session.get(url, headers=headers, timeout=(min(remaining, 2.0), remaining),
                                      allow_redirects=False, stream=True) as resp:
                with lock:
                    stats.requests += 1
                if resp.status_code in (401, 403):
                    raise FhirUnauthorized(f"FHIR server answered {resp.status_code}")
                if resp.status_code != 200:
                    raise FhirBadResponse(f"FHIR server answered {resp.status_code}")
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise FhirBadResponse("FHIR response too large")     # refused before reading a byte
                body = bytearray()
                try:
                    for chunk in resp.iter_content(65536):
                        self._reserve(len(chunk))
                        body += chunk
                        if len(body) > self.max_bytes:
                            raise FhirBadResponse("FHIR response too large")
                        if time.monotonic() > deadline:
                            raise FhirTimeout("deadline passed while reading")
                    with lock:
                        stats.bytes += len(body)
                    data = _parse(body)
                finally:
                    self._release(len(body))
        except requests.Timeout as exc:
            raise FhirTimeout("FHIR server timed out") from exc
        except (requests.RequestException, OSError) as exc:
            if time.monotonic() >= deadline or exchange.closed:
                raise FhirTimeout("deadline passed") from exc
            raise FhirBadResponse(f"FHIR server unreachable ({type(exc).__name__})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            raise FhirBadResponse("FHIR server sent something that is not a FHIR resource")
        if data["resourceType"] == "OperationOutcome":
            raise FhirBadResponse("FHIR server answered with an OperationOutcome")
        return data


def _parse(body: bytearray) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FhirBadResponse("FHIR server sent a body that is not JSON") from exc
