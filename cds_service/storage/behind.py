"""Store writes made behind the response: a bounded queue and one thread per worker process.

The card path hands its notes (which patient a card was issued for, for snooze; pruning of old notes) to this
queue and returns at once. A full queue (the store frozen, or far slower than the cards) drops the note and
counts it: a dropped note costs one snooze, never a card, and feedback on the card is still taken (its uuid
proves its issue, see card_ids.py).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable

log = logging.getLogger(__name__)


class BehindTheResponse:
    def __init__(self, maxsize: int = 1000):
        self.maxsize = maxsize
        self.dropped = 0
        self.failed = 0
        self._queue: queue.Queue | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], object], what: str) -> bool:
        """Queue `job`; False (and counted) when the queue is full. Never blocks."""
        q = self._started()
        try:
            q.put_nowait((job, what))
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("store write dropped: queue full", extra={"event": "behind_dropped", "what": what,
                                                                   "dropped": self.dropped})
            return False

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every queued job has run (tests, and a worker shutting down)."""
        q = self._queue
        if q is None:
            return True
        done = threading.Event()
        try:
            q.put((done.set, "drain"), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _started(self) -> queue.Queue:
        # the thread is started in the process that uses it: gunicorn forks workers after the app is made
        if self._queue is None or self._pid != os.getpid():
            with self._lock:
                if self._queue is None or self._pid != os.getpid():
                    self._queue = queue.Queue(self.maxsize)
                    self._pid = os.getpid()
                    threading.Thread(target=self._run, args=(self._queue,), name="store-behind", daemon=True).start()
        return self._queue

    def _run(self, q: queue.Queue) -> None:
        while True:
            job, what = q.get()
            try:
                job()
            except Exception as exc:             # noqa: BLE001 - a failed note is logged, the thread lives on
                self.failed += 1
                log.warning("store write failed: %s", type(exc).__name__, extra={"event": "behind_failed", "what": what})
