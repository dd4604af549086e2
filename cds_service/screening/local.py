"""The embedded engine: DuckDB groups the export by patient on this machine (`partition.py`, spilling to disk)
and worker processes, each loading the catalog once, evaluate the groups in patient-id order."""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path
from typing import Iterator

import orjson

from .export import ExportFile
from .outputs import burden_window
from .partition import ExportGroups, LoadReport
from .patients import CatalogHandoff, PatientScreen, Screened, init_worker, screen_batch, worker_context, worker_ready

BATCH = 16                     # patients per task sent to a worker


class LocalEngine:
    name = "local"

    def __init__(self, files: list[ExportFile], work: Path, as_of: date, workers: int, cards_dir: str | None,
                 handoff: CatalogHandoff | None = None) -> None:
        self.groups = ExportGroups(files, work)
        self.work = work
        self.pool: ProcessPoolExecutor | None = None
        self.as_of, self.workers, self.cards_dir, self.handoff = as_of, workers, cards_dir, handoff
        self.medications: dict[str, str] = {}
        self.worker_peak_rss = 0                # the largest worker's peak memory, as the workers report it

    def load(self, on_file=None) -> LoadReport:
        """Read the export; the worker processes start first, meanwhile, and build their catalogs from the main
        process's (`handoff`) as soon as it has loaded: a few seconds that would otherwise come between the load
        and the first patient."""
        medications_file = self.work / "medications.json"
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=worker_context(), initializer=init_worker,
                                            initargs=(self.cards_dir, self.as_of, str(medications_file),
                                                      self.handoff))
            # submitting starts a worker, which waits for the fork server's imports: not on this thread, which
            # reads the export meanwhile
            starting = threading.Thread(target=lambda: [self.pool.submit(worker_ready) for _ in range(self.workers)],
                                        name="workers-start", daemon=True)
            starting.start()
        report = self.groups.load(on_file)
        if self.pool is not None:
            starting.join()
        self.medications = self.groups.medications()
        if self.pool is not None:                  # the workers read it with their first batch
            medications_file.write_bytes(orjson.dumps(self.medications))
        return report

    def patient_count(self) -> int:
        return self.groups.patient_count()

    def results(self, survey, catalog) -> Iterator[list[Screened]]:
        """Batches of screened patients, in patient-id order; the first `survey.limit` patients feed the survey.
        With one worker, this process screens them with `catalog`."""
        self.groups.leave_out_unread(catalog, except_first=survey.limit)       # the survey's patients keep all
        batches = _batches(self.groups.patients(), survey)
        if self.workers <= 1:
            one = PatientScreen(self.cards_dir, self.as_of, self.medications, catalog)
            for batch in batches:
                yield _surveyed([one(p, lines, wanted) for p, lines, wanted in batch], survey)
            return
        assert self.pool is not None, "load() starts the workers"
        pending: deque = deque()
        for batch in batches:                     # bounded: never more than 4 tasks a worker in flight
            pending.append(self.pool.submit(screen_batch, batch))
            # in order: the oldest batch once it is done (its findings written now, not when the queue is full)
            while pending and (pending[0].done() or len(pending) >= self.workers * 4):
                yield self._take(pending.popleft().result(), survey)
        while pending:
            yield self._take(pending.popleft().result(), survey)

    def _take(self, done: tuple[list[Screened], int], survey) -> list[Screened]:
        results, peak = done
        self.worker_peak_rss = max(self.worker_peak_rss, peak)
        return _surveyed(results, survey)

    def encounters(self) -> list[tuple[str, str | None, str | None]]:
        return self.groups.encounters(*burden_window(self.as_of))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.groups.close()


def _surveyed(results: list[Screened], survey) -> list[Screened]:
    """The survey's rows of these patients merged, in patient-id order as they come."""
    for r in results:
        if r.survey_rows:
            survey.merge(r.survey_rows)
            r.survey_rows = None
    return results


def _batches(patients, survey):
    """Groups in batches of BATCH, the first ones smaller (1, 2, 4, 8): the first findings come from one patient,
    not from a whole batch. The first patients are marked for the code survey, which the worker runs beside them."""
    batch, size = [], 1
    for pid, lines in patients:
        batch.append((pid, lines, survey.take()))
        if len(batch) >= size:
            yield batch
            batch, size = [], min(size * 2, BATCH)
    if batch:
        yield batch
