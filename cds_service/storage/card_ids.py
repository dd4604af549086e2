"""Card uuids that prove their own issue, so that handing out a card writes nothing.

Feedback is taken only for cards this service issued within CDS_FEEDBACK_DAYS. Instead of noting every card in
the store on the card path (a frozen or full store then cost every patient-view its deadline, and a note that
could not be written made later feedback a permanent 404), each card uuid is a UUIDv8 (RFC 9562, custom layout)
that carries the second it was issued and a 64-bit MAC under the service's secret:

    bits 0-57   issue time (36 bits, seconds since 1970) and 22 random bits
    bits 58-121 HMAC-SHA256(key, those 58 bits and the client the card was issued to), first 64 bits
    (the version 8 and the RFC 9562 variant take the remaining 6 bits)

A uuid whose MAC does not verify under any configured secret (current first, older ones still read) was not
issued here; nor was it issued to a client other than the one sending feedback on it (the authenticated JWT
issuer: a client cannot act on another client's cards). Secrets rotate like the snooze secrets they are derived
from (with a label of their own).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets as random
import time
import uuid
from datetime import datetime, timezone

_LABEL = b"cds-card-uuid-v1"
_TIME_BITS, _RANDOM_BITS, _MAC_BITS = 36, 22, 64


class CardIds:
    def __init__(self, secrets: list[str]):
        if not secrets:
            raise ValueError("card ids need at least one secret")
        self.keys = [hmac.new(s.encode(), _LABEL, hashlib.sha256).digest() for s in secrets]

    def new(self, now: float | None = None, client: str = "") -> str:
        """A fresh card uuid stamped with `now` (seconds since 1970; default: the clock), for `client`."""
        issued = int(time.time() if now is None else now) & ((1 << _TIME_BITS) - 1)
        payload = (issued << _RANDOM_BITS) | random.randbits(_RANDOM_BITS)
        bits = (payload << _MAC_BITS) | self._mac(self.keys[0], payload, client)  # 122 bits
        # spread them around the version (bits 48-51) and variant (bits 64-65) of a 128-bit uuid
        high48, mid12, low62 = bits >> 74, (bits >> 62) & 0xFFF, bits & ((1 << 62) - 1)
        value = (high48 << 80) | (0x8 << 76) | (mid12 << 64) | (0b10 << 62) | low62
        return str(uuid.UUID(int=value))

    def issued_at(self, value: str, client: str = "") -> datetime | None:
        """When the card with this uuid was issued, if this service issued it to `client`; else None."""
        try:
            u = uuid.UUID(value)
        except (ValueError, AttributeError, TypeError):
            return None
        if u.version != 8 or u.variant != uuid.RFC_4122:
            return None
        n = u.int
        bits = ((n >> 80) << 74) | (((n >> 64) & 0xFFF) << 62) | (n & ((1 << 62) - 1))
        payload, mac = bits >> _MAC_BITS, bits & ((1 << _MAC_BITS) - 1)
        if not any(hmac.compare_digest(self._mac(key, payload, client).to_bytes(8, "big"), mac.to_bytes(8, "big"))
                   for key in self.keys):
            return None
        return datetime.fromtimestamp(payload >> _RANDOM_BITS, timezone.utc)

    @staticmethod
    def _mac(key: bytes, payload: int, client: str) -> int:
        digest = hmac.new(key, payload.to_bytes(8, "big") + client.encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big")
