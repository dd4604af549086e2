"""The cyclic garbage collector in long-lived evaluators: a request's record is freed by reference counting the
moment the request ends, and collections run between requests (or screened patients), not inside them."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest

from cds_service import create_app
from cds_service.config import Settings
from cds_service.fhir.record import PatientRecord
from cds_service.fhir.record.values import Measurement
from cds_service.services import CollectBetween

from .conftest import AS_OF, SERVICE_URL, fixture_request


@pytest.fixture
def collector_state():
    """Every test leaves the collector enabled, undebugged and with its garbage list empty."""
    yield
    gc.set_debug(0)
    gc.garbage.clear()
    gc.enable()


def _collections_during(fn) -> list[int]:
    seen: list[int] = []

    def note(phase, info):
        if phase == "start":
            seen.append(info["generation"])
    gc.callbacks.append(note)
    try:
        fn()
    finally:
        gc.callbacks.remove(note)
    return seen


@pytest.mark.parametrize("fixture", ["patients/ckd-positive.json", "patients/hyperthyroidism-lab-positive.json",
                                     "patients/glucocorticoids-positive.json"])
def test_a_patient_view_leaves_no_cycle_holding_the_patients_record(tmp_path, fixture, collector_state):
    """A record whose results point back at it would be freed (resources and all) only when the cyclic collector
    next ran: a chart's worth of objects kept per request, and re-walked by every collection meanwhile."""
    app = create_app(Settings(auth="off", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), log_level="WARNING"))
    client = app.test_client()
    body = fixture_request(fixture)
    assert client.post(SERVICE_URL, json=body).status_code == 200        # warm: memos filled once
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)                   # what a collection would free is kept in gc.garbage to look at
    response = client.post(SERVICE_URL, json=body)
    assert response.status_code == 200
    gc.collect()
    left = [o for o in gc.garbage if isinstance(o, (PatientRecord, Measurement))
            or (isinstance(o, dict) and o.get("resourceType"))]
    assert not left, f"{len(left)} record objects freed only by the cyclic collector"


def test_no_collection_runs_inside_a_unit_and_the_collector_resumes_after(collector_state):
    pacing = CollectBetween()

    def busy_unit():
        with pacing.unit():
            assert not gc.isenabled()
            keep = [[i] for i in range(50_000)]      # far past the young generation's threshold
            del keep
    assert _collections_during(busy_unit) == []
    assert gc.isenabled()
    # once resumed, a unit's cyclic garbage is collected on the collector's own pacing
    with pacing.unit():
        for _ in range(2_000):
            a: list = []
            a.append(a)
    assert _collections_during(lambda: [[i] for i in range(2_000)]) != []


def test_a_collector_already_off_stays_off(collector_state):
    gc.disable()
    with CollectBetween().unit():
        pass
    assert not gc.isenabled()


def test_overlapping_units_still_collect_every_overlap_limit_units(collector_state):
    """Under steady load on threads a unit is always in progress; cyclic garbage is still collected."""
    pacing = CollectBetween(overlap_limit=4)
    hold, release = threading.Event(), threading.Event()

    def long_unit():
        with pacing.unit():
            hold.set()
            release.wait(10)
    t = threading.Thread(target=long_unit)
    t.start()
    hold.wait(10)
    try:
        def short_units():
            for _ in range(4):
                with pacing.unit():
                    pass
        assert 2 in _collections_during(short_units)          # one full collection after the 4th overlapping unit
        assert not gc.isenabled()                              # the long unit is still in progress
    finally:
        release.set()
        t.join(10)
    assert gc.isenabled()


def test_a_unit_that_raises_still_resumes_the_collector(collector_state):
    pacing = CollectBetween()
    with pytest.raises(ValueError):
        with pacing.unit():
            raise ValueError("evaluation failed")
    assert gc.isenabled()


def test_a_result_read_after_its_record_is_gone_still_reads_safely(registry):
    """A Measurement counts an implausible value on its record through a weak link: read after the record was freed
    (a caller keeping a result past its request), the value is still refused, never an exception."""
    observation = {"resourceType": "Observation", "id": "ca-1", "status": "final",
                   "subject": {"reference": "Patient/p1"},
                   "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6", "display": "Calcium"}]},
                   "effectiveDateTime": "2026-01-10", "valueQuantity": {"value": 250, "unit": "mg/dL"}}
    prefetch = {"patient": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950-01-01"},
                "observations": {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": observation}]}}
    record = registry.kit.records.build(prefetch, "p1", AS_OF)
    calcium = record.observations["17861-6"][0]
    kept = weakref.ref(record)
    del record
    assert kept() is None                              # freed at once: no cycle held it
    assert calcium.value is None                       # 250 mg/dL: no real calcium, never evidence
