"""CDS Hooks 2.0 client authentication: a signed JWT on every call (spec "Trusting CDS Clients").

Verification is PyJWT's; this module decides which keys and claims to trust:
  * alg must be ES384 or RS384 (never `none`, never an HMAC);
  * `iss` must be a configured trusted issuer; its keys come from that issuer's JWKS URL, or
    from the `jku` header only when the issuer's allowlist names that URL (never fetched else);
    or, for an issuer with pinned keys, from the configured keys (a file, inline, or a URL of the
    deployment's choosing) whatever `jku` says, once that `jku` is one the issuer is known to send;
  * `kid` selects the key; an unknown `kid` refreshes the JWKS (at most once per cooldown);
  * `aud` must be the URL that was called (public base URL behind a proxy), `exp`/`iat` are
    checked with a small skew, and a `jti` seen before (within its lifetime) is a replay.
Failures raise AuthError; callers answer 401 without saying why.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from jwt import PyJWKClient

from ..storage.sqlite_util import ThreadLocalSQLite

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = ("ES384", "RS384")
REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]
# CDS Hooks 2.0 (Trusting CDS Clients): the JWT's expiration time SHOULD be no more than 5 minutes after issue
MAX_LIFETIME_S = 300


class AuthError(Exception):
    """The client JWT is missing or not trusted. The message is for logs only, never the client."""


@dataclass(frozen=True)
class TrustedIssuer:
    """How one issuer's signing keys are found.

    `jwks_urls`: the keys are fetched from these URLs; a token's `jku` must be one of them.
    Pinned (`keys` or `keys_url` set): a token's `jku`, when it has one, must be in `jku`, and the
    keys come from the pinned copy instead of the `jku` (offline and key-pinning deployments)."""
    jwks_urls: tuple[str, ...] = ()
    jku: tuple[str, ...] = ()
    keys_url: str | None = None
    keys: jwt.PyJWKSet | None = None

    @property
    def pinned(self) -> bool:
        return self.keys is not None or self.keys_url is not None


class JtiStore:
    """Seen `jti` values until they expire, shared by every worker through SQLite."""

    def __init__(self, path: str | Path):
        self.db = ThreadLocalSQLite(path, "CREATE TABLE IF NOT EXISTS jti (iss TEXT NOT NULL, jti TEXT NOT NULL,"
                                          " exp REAL NOT NULL, PRIMARY KEY (iss, jti));", synchronous="NORMAL")
        self._inserts = 0

    def _conn(self) -> sqlite3.Connection:
        return self.db.connection()

    def first_use(self, iss: str, jti: str, exp: float) -> bool:
        """Record the jti; False when it was already used (a replay)."""
        conn = self._conn()
        self._inserts += 1
        if self._inserts % 500 == 0:
            conn.execute("DELETE FROM jti WHERE exp < ?", (time.time() - 300,))
        try:
            conn.execute("INSERT INTO jti (iss, jti, exp) VALUES (?, ?, ?)", (iss, jti, exp))
            return True
        except sqlite3.IntegrityError:
            row = conn.execute("SELECT exp FROM jti WHERE iss = ? AND jti = ?", (iss, jti)).fetchone()
            if row and row[0] < time.time() - 300:           # expired long ago: reuse after purge window
                conn.execute("UPDATE jti SET exp = ? WHERE iss = ? AND jti = ?", (exp, iss, jti))
                return True
            return False


class SharedJtiStore:
    """The replay cache in the shared PostgreSQL store, so a token replayed to another replica is refused.
    If the database does not answer in time, this host's own cache decides (replays to this host are
    still refused) rather than every call failing or waiting."""

    def __init__(self, store, local: JtiStore, timeout: float = 1.0):
        self.store = store
        self.local = local
        self.timeout = timeout

    def first_use(self, iss: str, jti: str, exp: float) -> bool:
        from ..storage.feedback import StoreUnavailable
        first_here = self.local.first_use(iss, jti, exp)
        try:
            return self.store.call("first_use_jti", iss, jti, exp, time.time(), timeout=self.timeout) and first_here
        except StoreUnavailable:
            log.warning("shared jti cache unavailable: this host's cache decides", extra={"event": "jti_store_error"})
            return first_here


class ClientAuthenticator:
    def __init__(self, trusted_issuers: dict[str, TrustedIssuer | list[str]], jti_store: JtiStore, leeway: int = 30,
                 jwks_cache_seconds: int = 300, jwks_refresh_cooldown: float = 30):
        self.trusted = {iss: t if isinstance(t, TrustedIssuer) else TrustedIssuer(jwks_urls=tuple(t))
                        for iss, t in trusted_issuers.items()}
        self.jti = jti_store
        self.leeway = leeway
        self.jwks_cache_seconds = jwks_cache_seconds
        # an unknown kid refetches the JWKS at most once per cooldown, so forged kids cannot
        # turn the service into a request flood against the issuer
        self.jwks_refresh_cooldown = jwks_refresh_cooldown
        self._clients: dict[str, PyJWKClient] = {}
        self._lock = threading.Lock()

    def _jwks(self, url: str) -> PyJWKClient:
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = PyJWKClient(url, cache_keys=True, lifespan=self.jwks_cache_seconds, timeout=5,
                                     cooldown_duration=self.jwks_refresh_cooldown)
                self._clients[url] = client
            return client

    def _signing_key(self, issuer: TrustedIssuer, jku: object, kid: str):
        allowed = issuer.jku if issuer.pinned else issuer.jwks_urls
        if jku is not None and jku not in allowed:
            raise AuthError("jku not on the issuer's allowlist")   # and it is never fetched
        try:
            if issuer.keys is not None:
                return issuer.keys[kid].key
            return self._jwks(issuer.keys_url or jku or issuer.jwks_urls[0]).get_signing_key(kid).key
        except KeyError:
            raise AuthError("no key (kid not among the pinned keys)") from None
        except jwt.PyJWKClientError as exc:
            raise AuthError(f"no key ({type(exc).__name__})") from None

    def authenticate(self, authorization: str | None, audiences: list[str]) -> dict:
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("no bearer token")
        token = authorization[len("Bearer "):].strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token ({type(exc).__name__})") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError(f"algorithm {alg!r} not allowed")
        if header.get("typ") != "JWT":
            raise AuthError("typ must be JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("no kid")
        iss = unverified.get("iss")
        issuer = self.trusted.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("untrusted issuer")
        key = self._signing_key(issuer, header.get("jku"), kid)
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=audiences, issuer=iss, leeway=self.leeway,
                                options={"require": REQUIRED_CLAIMS, "verify_iat": True})
        except jwt.PyJWTError as exc:
            raise AuthError(f"rejected ({type(exc).__name__})") from None
        now = time.time()
        if not isinstance(claims.get("iat"), (int, float)) or claims["iat"] > now + self.leeway:
            raise AuthError("iat in the future")
        if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] - claims["iat"] > MAX_LIFETIME_S + self.leeway:
            raise AuthError("lifetime too long (exp - iat over 5 minutes)")
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise AuthError("no jti")
        if not self.jti.first_use(iss, claims["jti"], float(claims["exp"])):
            raise AuthError("replayed jti")
        return claims


def parse_trusted_issuers(raw: str) -> dict[str, TrustedIssuer]:
    """CDS_TRUSTED_ISSUERS, a JSON object from issuer to one of:
      * a JWKS URL, or a list of them (a token's `jku` must be one; its keys are fetched from it);
      * {"jwks": KEYS, "jku": [URL, ...]}: pinned keys. KEYS is a JWKS URL of the deployment's choosing,
        a path (or file:// URL) to a JWKS file read at start-up, or an inline JWKS object; tokens whose
        `jku` is listed (or that have none) are verified with these keys, and the `jku` is never fetched.
    URLs are https, or http on loopback (local tests only)."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError("CDS_TRUSTED_ISSUERS must be a JSON object") from exc
    if not isinstance(data, dict):
        raise ValueError("CDS_TRUSTED_ISSUERS must be a JSON object")
    from ..fhir.fhir_client import _is_loopback
    from urllib.parse import urlsplit

    def acceptable(url: object) -> bool:       # https, or http on loopback (local tests only)
        if not isinstance(url, str):
            return False
        parts = urlsplit(url)
        return parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname or ""))
    out = {}
    for iss, value in data.items():
        if isinstance(value, dict):
            out[iss] = _pinned_issuer(iss, value, acceptable)
            continue
        urls = [value] if isinstance(value, str) else value
        if not isinstance(urls, list) or not urls or not all(acceptable(u) for u in urls):
            raise ValueError(f"CDS_TRUSTED_ISSUERS[{iss!r}] must be an https JWKS URL, a list of them, "
                             'or {"jwks": ..., "jku": [...]}')
        out[iss] = TrustedIssuer(jwks_urls=tuple(urls))
    return out


def _pinned_issuer(iss: str, value: dict, acceptable) -> TrustedIssuer:
    where = f"CDS_TRUSTED_ISSUERS[{iss!r}]"
    unknown = set(value) - {"jwks", "jku"}
    if unknown or "jwks" not in value:
        raise ValueError(f'{where} must be {{"jwks": URL, path or JWKS object, "jku": [URL, ...]}}')
    jku = value.get("jku", [])
    jku = [jku] if isinstance(jku, str) else jku
    if not isinstance(jku, list) or not all(isinstance(u, str) and u for u in jku):
        raise ValueError(f"{where}.jku must be a URL or a list of URLs (the jku values the issuer sends)")
    keys = value["jwks"]
    if isinstance(keys, str) and acceptable(keys):
        return TrustedIssuer(jku=tuple(jku), keys_url=keys)
    if isinstance(keys, str):
        path = Path(keys[len("file://"):] if keys.startswith("file://") else keys)
        try:
            keys = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}.jwks: cannot read a JWKS from {path} ({type(exc).__name__})") from None
    try:
        key_set = jwt.PyJWKSet.from_dict(keys)
    except (jwt.PyJWTError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"{where}.jwks is not a usable JWKS ({type(exc).__name__})") from None
    return TrustedIssuer(jku=tuple(jku), keys=key_set)
