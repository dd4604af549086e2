"""Snooze: a card the clinician overrode or acted on stays away for that patient for a while.

The link from a card to its patient is a keyed hash (HMAC-SHA256 with a secret from configuration)
of the FHIR server and patient id, never the raw id. Secrets rotate without losing snoozes: the first
secret writes, every listed secret is tried when reading. A snooze ends early when the patient's
record shows something the snoozed card did not: a new cause, a new fracture or a treatment gap.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
from datetime import datetime, timedelta, timezone

import orjson

from ..clinical.assessment import Assessment

log = logging.getLogger(__name__)


CLOCK_SKEW = timedelta(minutes=5)
# a store that did not answer a snooze read is not asked again on the card path for this long: one card pays the
# read's deadline, the next ones go out at healthy speed (unchecked for snooze) until the store is tried again
SKIP_AFTER_FAILURE_S = 30.0


class SnoozeBook:
    def __init__(self, store, secrets: list[str], days: int, timeout: float = 0.5, behind=None):
        if not secrets:
            raise ValueError("snooze needs at least one secret")
        self.store = store
        self.behind = behind               # a BehindTheResponse: notes written after the card has gone out
        self._skip_until = 0.0             # after a store failure, no snooze read (and no wait) until then
        self.timeout = timeout             # patient-view waits at most this for the store, then goes on
        self.secrets = [s.encode() for s in secrets]
        self.days = days

    def _store(self, method: str, *args):
        call = getattr(self.store, "call", None)          # a GuardedStore: with this book's deadline
        return call(method, *args, timeout=self.timeout) if call else getattr(self.store, method)(*args)

    def patient_keys(self, fhir_server: str, patient_id: str, client: str = "") -> list[str]:
        """The patient's key under every configured secret, the current one first: bound to the authenticated
        client (JWT issuer) and the FHIR server, so one client's feedback never snoozes another client's cards."""
        msg = ((f"{client}\n" if client else "") + f"{fhir_server.rstrip('/')}|{patient_id}").encode()
        return [hmac.new(secret, msg, hashlib.sha256).hexdigest() for secret in self.secrets]

    @staticmethod
    def signature(a: Assessment) -> list[str]:
        """What the card was about: its causes, its fractures, and whether it named a treatment gap."""
        out = {f"cause:{f.cause.id}" for f in a.findings}
        # a fracture's record id is the chart's own: kept as a digest, never in clear beside the patient key
        out |= {"fracture:" + hashlib.sha256(e.reference.encode()).hexdigest()[:24] for e in a.context.fractures}
        if a.context.treatment_gap:
            out.add("treatment_gap")
        return sorted(out)

    def is_snoozed(self, fhir_server: str, patient_id: str, a: Assessment, now: datetime, client: str = "") -> bool:
        found = self._store("snooze_for", self.patient_keys(fhir_server, patient_id, client))
        if found is None:
            return False
        until, signature = found
        if datetime.fromisoformat(until) <= now:
            return False
        return set(self.signature(a)) <= set(orjson.loads(signature))    # nothing new since the snooze

    def issue_notes(self, card_uuids: list[str], fhir_server: str, patient_id: str, a: Assessment, now: datetime,
              client: str = "") -> list[tuple[str, str, str, str]]:
        """The store's notes of whom these cards were issued for: plain text, one row per card."""
        key = self.patient_keys(fhir_server, patient_id, client)[0]
        signature = orjson.dumps(self.signature(a)).decode()
        return [(card_uuid, key, signature, now.isoformat()) for card_uuid in card_uuids]

    def apply(self, response: dict, fhir_server: str, a: Assessment, now: datetime | None = None,
              client: str = "") -> bool:
        """Drop the card when the patient is snoozed (True), else remember whom it was issued for.
        A store that fails is logged and the card goes out: snooze never costs a clinician a card."""
        if not response.get("cards"):
            return False
        now = now or datetime.now(timezone.utc)
        if time.monotonic() < self._skip_until:
            return False                   # the store failed just now: cards go out unchecked for a little while
        try:
            if self.is_snoozed(fhir_server, a.patient_id, a, now, client):
                response["cards"] = []
                return True
            # made here as plain rows, written in one transaction behind the response: a job holding the assessment
            # would keep the patient's whole record alive for as long as it waits in the queue
            notes = self.issue_notes([card["uuid"] for card in response["cards"]], fhir_server, a.patient_id, a, now,
                                     client)
            if self.behind is not None:                     # the cards do not wait for their notes
                self.behind.submit(lambda: self._store("record_issued", notes), "snooze notes")
            else:
                self._store("record_issued", notes)
        except Exception as exc:                       # noqa: BLE001 - the card matters more than the snooze
            self._skip_until = time.monotonic() + SKIP_AFTER_FAILURE_S
            log.warning("snooze store unavailable: %s", type(exc).__name__, extra={"event": "snooze_store_error"})
        return False

    def on_feedback(self, entries: list[dict]) -> int:
        """Snooze the patient of each card overridden or acted on; returns how many snoozes were set."""
        done = 0
        for e in entries:
            card = self._store("issued_card", e["card"])
            if card is None or not card[0]:
                continue                    # not a card this service issued (or issued while snooze was off)
            patient_key, signature = card
            at = datetime.fromisoformat(e["outcomeTimestamp"].upper().replace("Z", "+00:00"))
            if at.tzinfo is None:
                at = at.replace(tzinfo=timezone.utc)
            # a caller's clock is not trusted past now (plus skew): a timestamp in 2199 or 9999 snoozes from now
            now = datetime.now(timezone.utc)
            at = min(at, now + CLOCK_SKEW)
            until = (at + timedelta(days=self.days)).astimezone(timezone.utc)
            self._store("set_snooze", patient_key, until.isoformat(), signature, e["card"])
            done += 1
        return done
