"""CDS Hooks feedback: validation and durable storage keyed by card uuid.

A feedback POST is acknowledged only after its rows are committed (SQLite in WAL mode with
synchronous=FULL), so nothing acknowledged is lost. Re-posting the same entry is idempotent.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import orjson

from ..errors import BadRequest, PayloadTooLarge
from .sqlite_util import ThreadLocalSQLite


def normalize_feedback(body: object) -> list[dict]:
    """Validate a 2.0 feedback body (and tolerate the older shapes); return normalized entries."""
    if not isinstance(body, dict) or not isinstance(body.get("feedback"), list) or not body["feedback"]:
        raise BadRequest("The body must be an object with a non-empty 'feedback' array.")
    if len(body["feedback"]) > MAX_ENTRIES:
        raise PayloadTooLarge(f"At most {MAX_ENTRIES} feedback entries per request (this one has {len(body['feedback'])}).")
    out = []
    for n, item in enumerate(body["feedback"]):
        where = f"feedback[{n}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object.")
        card = item.get("card")
        if not isinstance(card, str) or not card.strip():
            raise BadRequest(f"{where}.card (the card uuid) is required.")
        if len(card) > 100:
            raise BadRequest(f"{where}.card is not a card uuid this service issued.")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise BadRequest(f"{where}.outcome must be 'accepted' or 'overridden'.")
        ts = item.get("outcomeTimestamp")
        if not isinstance(ts, str) or not _is_timestamp(ts):
            raise BadRequest(f"{where}.outcomeTimestamp must be an RFC 3339 date-time with a time zone "
                             "(e.g. 2026-05-02T14:03:11Z).")
        accepted: list[str] = []
        raw_acc = item.get("acceptedSuggestions")
        if raw_acc is not None:
            if not isinstance(raw_acc, list):
                raise BadRequest(f"{where}.acceptedSuggestions must be an array.")
            if len(raw_acc) > MAX_ENTRIES:
                raise PayloadTooLarge(f"{where}.acceptedSuggestions: at most {MAX_ENTRIES} (a card has a few).")
            for s in raw_acc:
                sid = s.get("id") if isinstance(s, dict) else None     # AcceptedSuggestion objects, as 2.0 says
                if not isinstance(sid, str) or not sid.strip():
                    raise BadRequest(f"{where}.acceptedSuggestions items must be objects with a string 'id'.")
                accepted.append(sid)
        if outcome == "accepted" and not accepted:
            raise BadRequest(f"{where}: an accepted outcome needs acceptedSuggestions.")
        reason = comment = None
        raw_or = item.get("overrideReason")
        if raw_or is not None:
            if not isinstance(raw_or, dict):
                raise BadRequest(f"{where}.overrideReason must be an object.")
            if "userComment" in raw_or and not isinstance(raw_or["userComment"], str):
                raise BadRequest(f"{where}.overrideReason.userComment must be a string.")
            if "code" in raw_or and "reason" not in raw_or:
                raw_or = {"reason": raw_or}                           # a bare Coding: pre-2.0 clients
            reason = raw_or.get("reason")
            comment = raw_or.get("userComment")
            if isinstance(reason, dict):
                if any(k in reason and not isinstance(reason[k], str) for k in ("system", "code", "display")):
                    raise BadRequest(f"{where}.overrideReason.reason must be a Coding of strings.")
                reason = {k: reason[k] for k in ("system", "code", "display") if k in reason}
            if reason is None and comment is None:
                raise BadRequest(f"{where}.overrideReason needs a reason or a userComment.")
            if reason is not None and (not isinstance(reason, dict) or not isinstance(reason.get("code"), str)):
                raise BadRequest(f"{where}.overrideReason.reason must be a Coding with a code.")
            if comment is not None and not isinstance(comment, str):
                raise BadRequest(f"{where}.overrideReason.userComment must be a string.")
            if comment is not None and len(comment) > MAX_COMMENT_CHARS:
                raise PayloadTooLarge(f"{where}.overrideReason.userComment: at most {MAX_COMMENT_CHARS} characters.")
        out.append({"card": card, "outcome": outcome, "outcomeTimestamp": ts, "acceptedSuggestions": accepted,
                    "reason": reason, "userComment": comment})
    return out


MAX_ENTRIES = 50               # feedback entries per request, and accepted suggestions per entry
MAX_COMMENT_CHARS = 4000       # a clinician's override comment

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _is_timestamp(value: str) -> bool:
    """RFC 3339 section 5.6 date-time: a full date, a time and a time zone; then a real instant."""
    if not _RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


class FeedbackStore(Protocol):
    def save(self, service_id: str, entries: list[dict]) -> int: ...
    def entries_for_card(self, card_uuid: str) -> list[dict]: ...
    def count(self) -> int: ...


# every card issued (feedback is taken only for these), which patient it was issued for (a keyed hash, ""
# when snooze is off), and snoozes per patient: the same in both stores
SNOOZE_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued_cards (
    card_uuid TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    issued_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snoozes (
    patient_key TEXT PRIMARY KEY,
    until TEXT NOT NULL,
    signature TEXT NOT NULL,
    card_uuid TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS service_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    service_id TEXT NOT NULL,
    card_uuid TEXT NOT NULL,
    outcome TEXT NOT NULL,
    outcome_timestamp TEXT NOT NULL,
    accepted_suggestions TEXT NOT NULL,
    override_system TEXT,
    override_code TEXT,
    override_comment TEXT,
    entry_hash TEXT NOT NULL UNIQUE,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card_uuid);
""" + SNOOZE_SCHEMA


class SQLiteFeedbackStore:
    """The embedded default store. Safe across threads and worker processes (SQLite locking)."""

    def __init__(self, path: str | Path):
        self.db = ThreadLocalSQLite(path, SCHEMA, synchronous="FULL", busy_timeout_ms=2000)   # durable before the 200
        # the note that a card was issued is on every card's path: committed without waiting for the disk
        # (WAL, synchronous=NORMAL: it survives a crash of the process, not of the machine)
        self.notes = ThreadLocalSQLite(path, SCHEMA, synchronous="NORMAL", busy_timeout_ms=2000)
        self.path = self.db.path
        self._identity = self._file_identity()
        # one writer at a time in this process, in arrival order: SQLite's busy handler polls with growing sleeps,
        # so 16 threads saving at once could leave one past the busy timeout while the file was never idle long
        self._write_lock = threading.Lock()

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _same_file(self) -> None:
        """A database file deleted or replaced under the service: open connections would go on writing to the
        unlinked file, acknowledged and lost at restart. Refuse instead (503, and /readyz false)."""
        if self._file_identity() != self._identity:
            raise sqlite3.OperationalError(f"the feedback database file {self.path} was deleted or replaced")

    def _connect(self) -> sqlite3.Connection:
        return self.db.connection()

    def save(self, service_id: str, entries: list[dict]) -> int:
        now = datetime.now(timezone.utc).isoformat()
        rows = []
        for e in entries:
            digest = _entry_hash(service_id, e)
            reason = e["reason"] or {}
            rows.append((service_id, e["card"], e["outcome"], e["outcomeTimestamp"],
                         orjson.dumps(e["acceptedSuggestions"]).decode(), reason.get("system"), reason.get("code"),
                         e["userComment"], digest, now))
        self._same_file()
        conn = self._connect()
        with self._write_lock:
            return self._insert(conn, rows)

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[tuple]) -> int:
        return _insert_all(conn, "INSERT OR IGNORE INTO feedback (service_id, card_uuid, outcome, outcome_timestamp, "
                                 "accepted_suggestions, override_system, override_code, override_comment, entry_hash, "
                                 "received_at) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)

    def entries_for_card(self, card_uuid: str) -> list[dict]:
        conn = self._connect()
        cur = conn.execute("SELECT outcome, outcome_timestamp, accepted_suggestions, override_system, override_code,"
                           " override_comment FROM feedback WHERE card_uuid = ? ORDER BY id", (card_uuid,))
        return [{"outcome": r[0], "outcomeTimestamp": r[1], "acceptedSuggestions": orjson.loads(r[2]),
                 "overrideSystem": r[3], "overrideCode": r[4], "userComment": r[5]} for r in cur.fetchall()]

    def count(self) -> int:
        return self._connect().execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def ping(self) -> None:
        """Ready means able to take a write: the file is the one opened, and a write transaction can begin (a
        read-only file, a full disk's journal or a lock held elsewhere fail here)."""
        self._same_file()
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")

    # ---- snooze: which patient a card was issued for (a keyed hash), and snoozes per patient ----
    def record_issued(self, notes: list[tuple[str, str, str, str]]) -> None:
        """Note cards as issued: (card uuid, patient key, signature, issued at) each, in one transaction."""
        _insert_all(self.notes.connection(), "INSERT OR IGNORE INTO issued_cards VALUES (?,?,?,?)", notes)

    def issued_since(self, card_uuids: list[str], since: str) -> set[str]:
        """The cards among these that were issued at or after `since` (ISO 8601, UTC)."""
        marks = ",".join("?" * len(card_uuids))
        rows = self._connect().execute(f"SELECT card_uuid FROM issued_cards WHERE card_uuid IN ({marks})"
                                       " AND issued_at >= ?", [*card_uuids, since]).fetchall()
        return {r[0] for r in rows}

    def forget_issued_before(self, before: str) -> int:
        """Drop the notes of cards issued before `before`: feedback on them is no longer taken."""
        return self.notes.connection().execute("DELETE FROM issued_cards WHERE issued_at < ?", (before,)).rowcount

    def issued_card(self, card_uuid: str) -> tuple[str, str] | None:
        row = self._connect().execute("SELECT patient_key, signature FROM issued_cards WHERE card_uuid = ?",
                                      (card_uuid,)).fetchone()
        return (row[0], row[1]) if row else None

    def set_snooze(self, patient_key: str, until: str, signature: str, card_uuid: str) -> None:
        self._connect().execute(
            "INSERT INTO snoozes VALUES (?,?,?,?) ON CONFLICT (patient_key) DO UPDATE SET until = excluded.until,"
            " signature = excluded.signature, card_uuid = excluded.card_uuid"
            " WHERE excluded.until > snoozes.until",                # older feedback never shortens a snooze
            (patient_key, until, signature, card_uuid))

    def secret(self, name: str) -> str:
        """A secret kept with the store, made (32 random bytes) the first time it is asked for: every worker and
        process using this store reads the same one."""
        conn = self._connect()
        conn.execute("INSERT INTO service_secrets VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                     (name, secrets.token_hex(32)))
        conn.commit()
        return conn.execute("SELECT value FROM service_secrets WHERE name = ?", (name,)).fetchone()[0]

    def snooze_for(self, patient_keys: list[str]) -> tuple[str, str] | None:
        marks = ",".join("?" * len(patient_keys))
        row = self._connect().execute(f"SELECT until, signature FROM snoozes WHERE patient_key IN ({marks})"
                                      " ORDER BY until DESC LIMIT 1", patient_keys).fetchone()
        return (row[0], row[1]) if row else None


def _insert_all(conn: sqlite3.Connection, sql: str, rows: list[tuple]) -> int:
    """`sql` for every row in one write transaction (all or none); how many rows it inserted."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return cur.rowcount


CONNECT_TIMEOUT_S = 2          # PostgreSQL: a server that does not answer is given up on after this
STATEMENT_TIMEOUT_MS = 2000    # and a statement the server cannot finish in time is cancelled by it

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id BIGSERIAL PRIMARY KEY,
    service_id TEXT NOT NULL,
    card_uuid TEXT NOT NULL,
    outcome TEXT NOT NULL,
    outcome_timestamp TEXT NOT NULL,
    accepted_suggestions TEXT NOT NULL,
    override_system TEXT,
    override_code TEXT,
    override_comment TEXT,
    entry_hash TEXT NOT NULL UNIQUE,
    received_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card_uuid);
CREATE TABLE IF NOT EXISTS jti (
    iss TEXT NOT NULL,
    jti TEXT NOT NULL,
    exp DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (iss, jti)
);
""" + SNOOZE_SCHEMA


class PostgresFeedbackStore:
    """Shared store for several workers or replicas. A row is acknowledged only after COMMIT
    (synchronous_commit as the server is configured: durable by default)."""

    def __init__(self, url: str):
        import psycopg
        self._psycopg = psycopg
        self.url = url
        self._local = threading.local()
        try:
            with psycopg.connect(url, autocommit=False, connect_timeout=CONNECT_TIMEOUT_S) as conn:   # never crosses a fork
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(4242001)")   # workers may start at once
                    cur.execute(PG_SCHEMA)
                conn.commit()
        except psycopg.Error as exc:                   # a start-up error of one line, without the password
            where = urlsplit(url)
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ConnectionError(f"cannot open the feedback store at PostgreSQL {where.hostname or 'localhost'}:"
                                  f"{where.port or 5432}{where.path} ({reason})") from None

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._psycopg.connect(self.url, autocommit=False, connect_timeout=CONNECT_TIMEOUT_S,
                                         options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
            self._local.conn = conn
        return conn

    def _run(self, fn):
        """Run fn(conn) in a transaction; one retry on a dropped connection (server restart)."""
        for attempt in (1, 2):
            conn = self._conn()
            try:
                with conn.transaction():
                    return fn(conn)
            except self._psycopg.OperationalError:
                self._local.conn = None
                try:
                    conn.close()
                finally:
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def save(self, service_id: str, entries: list[dict]) -> int:
        now = datetime.now(timezone.utc)
        rows = [(service_id, e["card"], e["outcome"], e["outcomeTimestamp"], orjson.dumps(e["acceptedSuggestions"]).decode(),
                 (e["reason"] or {}).get("system"), (e["reason"] or {}).get("code"), e["userComment"],
                 _entry_hash(service_id, e), now) for e in entries]

        def insert(conn) -> int:
            stored = 0
            with conn.cursor() as cur:
                for row in rows:
                    cur.execute("INSERT INTO feedback (service_id, card_uuid, outcome, outcome_timestamp,"
                                " accepted_suggestions, override_system, override_code, override_comment, entry_hash,"
                                " received_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                                " ON CONFLICT (entry_hash) DO NOTHING", row)
                    stored += cur.rowcount
            return stored
        return self._run(insert)

    def entries_for_card(self, card_uuid: str) -> list[dict]:
        def select(conn):
            with conn.cursor() as cur:
                cur.execute("SELECT outcome, outcome_timestamp, accepted_suggestions, override_system, override_code,"
                            " override_comment FROM feedback WHERE card_uuid = %s ORDER BY id", (card_uuid,))
                return cur.fetchall()
        return [{"outcome": r[0], "outcomeTimestamp": r[1], "acceptedSuggestions": orjson.loads(r[2]),
                 "overrideSystem": r[3], "overrideCode": r[4], "userComment": r[5]} for r in self._run(select)]

    def count(self) -> int:
        def count(conn):
            with conn.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM feedback")
                return cur.fetchone()[0]
        return self._run(count)

    def ping(self) -> None:
        self._execute("SELECT 1", (), True)

    def first_use_jti(self, iss: str, jti: str, exp: float, now: float) -> bool:
        """Record a JWT id for every replica at once; False when it was used already (a replay). An id
        whose token expired more than five minutes ago may be used again (the purge window)."""
        row = self._execute("INSERT INTO jti (iss, jti, exp) VALUES (%s, %s, %s) ON CONFLICT (iss, jti) DO UPDATE"
                            " SET exp = excluded.exp WHERE jti.exp < %s RETURNING 1", (iss, jti, exp, now - 300), True)
        self._jti_inserts = getattr(self, "_jti_inserts", 0) + 1
        if self._jti_inserts % 500 == 0:                     # purge expired ids now and then
            self._execute("DELETE FROM jti WHERE exp < %s", (now - 300,))
        return row is not None

    def _execute(self, sql: str, params: tuple, fetch: bool = False):
        def run(conn):
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone() if fetch else None
        return self._run(run)

    def record_issued(self, notes: list[tuple[str, str, str, str]]) -> None:
        def insert(conn):
            with conn.cursor() as cur:
                cur.execute("SET LOCAL synchronous_commit TO OFF")      # a note on every card's path: no flush wait
                cur.executemany("INSERT INTO issued_cards VALUES (%s,%s,%s,%s) ON CONFLICT (card_uuid) DO NOTHING",
                                notes)
        self._run(insert)

    def issued_since(self, card_uuids: list[str], since: str) -> set[str]:
        """The cards among these that were issued at or after `since` (ISO 8601, UTC)."""
        def select(conn):
            with conn.cursor() as cur:
                cur.execute("SELECT card_uuid FROM issued_cards WHERE card_uuid = ANY(%s) AND issued_at >= %s",
                            (card_uuids, since))
                return {r[0] for r in cur.fetchall()}
        return self._run(select)

    def forget_issued_before(self, before: str) -> int:
        """Drop the notes of cards issued before `before`: feedback on them is no longer taken."""
        def delete(conn):
            with conn.cursor() as cur:
                cur.execute("DELETE FROM issued_cards WHERE issued_at < %s", (before,))
                return cur.rowcount
        return self._run(delete)

    def issued_card(self, card_uuid: str) -> tuple[str, str] | None:
        row = self._execute("SELECT patient_key, signature FROM issued_cards WHERE card_uuid = %s", (card_uuid,), True)
        return (row[0], row[1]) if row else None

    def set_snooze(self, patient_key: str, until: str, signature: str, card_uuid: str) -> None:
        self._execute("INSERT INTO snoozes VALUES (%s,%s,%s,%s) ON CONFLICT (patient_key) DO UPDATE SET"
                      " until = excluded.until, signature = excluded.signature, card_uuid = excluded.card_uuid"
                      " WHERE excluded.until > snoozes.until",      # older feedback never shortens a snooze
                      (patient_key, until, signature, card_uuid))

    def secret(self, name: str) -> str:
        """A secret kept with the store (shared by every replica), made the first time it is asked for."""
        self._execute("INSERT INTO service_secrets VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                      (name, secrets.token_hex(32)))
        return self._execute("SELECT value FROM service_secrets WHERE name = %s", (name,), fetch=True)[0]

    def snooze_for(self, patient_keys: list[str]) -> tuple[str, str] | None:
        row = self._execute("SELECT until, signature FROM snoozes WHERE patient_key = ANY(%s) ORDER BY until DESC LIMIT 1",
                            (patient_keys,), True)
        return (row[0], row[1]) if row else None


class StoreUnavailable(Exception):
    """The store did not answer in time (stuck, locked, down or busy): the caller answers 503 or goes on."""


class GuardedStore:
    """Every store call runs on a small pool of its own threads with a deadline, so a stuck or down
    database costs a caller at most `timeout` seconds and never holds a request thread; while the pool
    is saturated by stuck calls, new calls fail at once instead of queueing behind them."""

    def __init__(self, store, timeout: float = 2.0, threads: int = 4):
        self.store = store
        self.timeout = timeout
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None      # created on first use: after a worker forks
        self._pool_pid = 0
        self._running = 0
        self._lock = threading.Lock()

    def call(self, method: str, *args, timeout: float | None = None):
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="store")
                self._pool_pid, self._running = os.getpid(), 0
            if self._running >= self.threads:
                raise StoreUnavailable("busy")
            self._running += 1
        future = self._pool.submit(self._run, method, args)
        try:
            return future.result(timeout or self.timeout)
        except FutureTimeout:
            raise StoreUnavailable("timeout") from None

    def _run(self, method: str, args: tuple):
        try:
            return getattr(self.store, method)(*args)
        except StoreUnavailable:
            raise
        except Exception as exc:              # noqa: BLE001 - locked, refused, reset: all mean "not now"
            if isinstance(exc, (TypeError, AttributeError)):
                raise
            raise StoreUnavailable(type(exc).__name__) from exc
        finally:
            with self._lock:
                self._running -= 1

    def __getattr__(self, method: str):
        """store.save(...) and the rest, with the deadline."""
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args: self.call(method, *args)


def _entry_hash(service_id: str, entry: dict) -> str:
    """Identity of a feedback entry, so that a re-post is stored once."""
    return hashlib.sha256(json.dumps([service_id, entry], sort_keys=True, default=str).encode()).hexdigest()


def open_store(url: str) -> FeedbackStore:
    if url.startswith("sqlite:///"):
        return SQLiteFeedbackStore(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresFeedbackStore(url)
    raise ValueError("CDS_DATABASE_URL must be sqlite:///<path> or postgresql://user@host:port/db")
