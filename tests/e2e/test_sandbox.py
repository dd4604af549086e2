"""The real CDS Hooks sandbox (the static build in ../shared/cds-hooks-sandbox) in headless Chromium,
driving the production server (`cds-service serve`, client JWTs required, the sandbox's issuer trusted
through a pinned copy of its JWKS) and the in-memory FHIR server, all on loopback: what an integration
engineer sees. Screenshots and the text of every card land in build/e2e/ as test artefacts."""
from __future__ import annotations

import functools
import json
import re
import shutil
import signal
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cds_service.fhir.bundles import bundle_resources
from cds_service.storage.feedback import SQLiteFeedbackStore

from ..conftest import ROOT, FhirServer, LiveServer, load_fixture

sys.path.insert(0, str(ROOT))
from fixtures.generate import ICD, Patient  # noqa: E402

SANDBOX = ROOT.parent / "shared" / "cds-hooks-sandbox"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "build" / "e2e"
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
INJECTION = ("[click](http://evil.example/a) http://evil.example/b www.evil.example user@evil.example "
             "Tom &amp; Jerry <b>bold</b>")
# the sandbox's colour for each indicator (#0079be, #ffae42, #c00), as the browser computes it
INDICATOR_COLOURS = {"info": "rgb(0, 121, 190)", "warning": "rgb(255, 174, 66)", "critical": "rgb(204, 0, 0)"}




def _injection_patient() -> list[dict]:
    p = Patient("e2e-injection", age=66, style="searchset")
    p.condition(ICD, "M06.9", INJECTION)                        # rheumatoid arthritis, recorded with that text
    return bundle_resources(p.bundle())


def _copy_of(rel: str, patient_id: str) -> list[dict]:
    """A fixture patient's resources under another Patient id (and fresh ids for the rest)."""
    original = bundle_resources(load_fixture(rel))
    text = json.dumps(original).replace(original[0]["id"], patient_id)
    for r in original[1:]:
        text = text.replace(r["id"], r["id"][:-6] + "e2e-cp")
    return json.loads(text)


class StaticSandbox:
    """The sandbox's static build on a loopback port."""

    def __init__(self):
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(SANDBOX)))
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert CHROMIUM, "the e2e suite needs Debian's chromium (make install-test installs it)"
    assert (SANDBOX / "index.html").exists(), "the sandbox build is ../shared/cds-hooks-sandbox"
    tmp = tmp_path_factory.mktemp("e2e")
    resources = []
    for rel in ("patients/glucocorticoids-positive.json", "patients/no-risk-factors-negative.json"):
        resources += bundle_resources(load_fixture(rel))
    # feedback snoozes the patient's card (on by default): each feedback test opens a chart of its own
    resources += _copy_of("patients/glucocorticoids-positive.json", "e2e-gc-dismiss")
    resources += _injection_patient()
    for pid in ("e2e-rx-sign", "e2e-rx-both"):
        resources += bundle_resources(Patient(pid, age=67, style="searchset").bundle())
    (tmp / "fhir.json").write_text(json.dumps(resources))
    fhir = FhirServer(tmp / "fhir.json")
    trusted = {SANDBOX_ISS: {"jwks": str(SANDBOX / ".well-known" / "jwks.json"), "jku": [SANDBOX_JKU]}}
    service = LiveServer(tmp / "service", env={"CDS_AUTH": "required", "CDS_TRUSTED_ISSUERS": json.dumps(trusted),
                                                "CDS_CORS_ORIGINS": "*"}).start()
    sandbox = StaticSandbox()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield {"fhir": fhir, "service": service, "sandbox": sandbox, "browser": browser,
                   "store": SQLiteFeedbackStore(tmp / "service" / "feedback.sqlite3")}
        finally:
            browser.close()
            sandbox.stop()
            service.kill(signal.SIGTERM)
            fhir.stop()


class Session:
    """One sandbox tab with our services added through its UI; records the cards each call returns."""

    def __init__(self, stack, name: str, patient_id: str):
        self.stack, self.name, self.shots = stack, name, 0
        self.context = stack["browser"].new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.responses: list[dict] = []
        self.page.on("response", self._collect)
        self.page.goto(f"{stack['sandbox'].base}/?fhirServiceUrl={stack['fhir'].base}&patientId={patient_id}")
        self.page.get_by_text(f"{patient_id} Fixture").first.wait_for(timeout=15000)

    def _collect(self, response):
        if "/cds-services/" in response.url and response.request.method == "POST" \
                and not response.url.endswith("/feedback") and response.status == 200:
            try:
                self.responses.append({"url": response.url, "body": response.json()})
            except Exception:                  # noqa: BLE001 - a body the page already consumed
                pass

    def add_services(self) -> None:
        page = self.page
        page.locator("header button").last.click()                  # the gear menu
        page.get_by_text("Add CDS Services").click()
        page.fill("input[name=discovery-endpoint-input]", self.stack["service"].base + "/cds-services")
        self.shot("add-service")
        page.get_by_role("button", name="Save").click()

    def cards(self):
        return self.page.locator("[class*=decision-card]")

    def wait_for_card(self, summary_start: str):
        card = self.cards().filter(has_text=summary_start).first
        card.wait_for(timeout=20000)
        return card

    def last_card_from(self, service_id: str) -> dict:
        bodies = [r["body"] for r in self.responses if r["url"].endswith("/" + service_id) and r["body"]["cards"]]
        return bodies[-1]["cards"][0]

    def shot(self, step: str) -> None:
        self.shots += 1
        self.page.screenshot(path=str(ARTIFACTS / f"{self.name}-{self.shots:02d}-{step}.png"), full_page=True)

    def save_text(self, card) -> str:
        text = card.inner_text()
        (ARTIFACTS / f"{self.name}.txt").write_text(text + "\n")
        return text

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(stack, request):
    opened = []

    def open_(patient_id: str) -> Session:
        s = Session(stack, request.node.name, patient_id)
        opened.append(s)
        return s
    yield open_
    for s in opened:
        s.close()


def _feedback_posted(s: Session):
    return s.page.expect_response(lambda r: r.url.endswith("/feedback") and r.request.method == "POST")


# ---- patient-view ----------------------------------------------------------------------------------
def test_the_service_added_through_the_ui_renders_the_positive_card_in_full(session):
    s, card, sent = _positive_card(session)
    s.shot("card")
    text = s.save_text(card)
    assert sent["summary"] in text
    summary = card.get_by_text(sent["summary"]).first
    assert sent["indicator"] == "warning"
    assert summary.evaluate("e => getComputedStyle(e).color") == INDICATOR_COLOURS["warning"]
    assert "Systemic glucocorticoid therapy" in text and "predniSONE 5 MG Oral Tablet, 10 mg/day" in text
    assert "Bone health context" in text and "No DXA in the last 730 days" in text
    for suggestion in sent["suggestions"]:
        assert card.get_by_role("button", name=suggestion["label"]).is_visible()
    for link in sent["links"]:
        assert card.get_by_role("button", name=link["label"][:60]).first.is_visible()
    card.get_by_label("select dismiss reason").click()
    s.shot("override-menu")
    menu = s.page.get_by_role("menuitem")
    shown = menu.all_inner_texts()
    assert [r["display"] for r in sent["overrideReasons"]] == [re.sub(r"^Override: ", "", t) for t in shown]
    s.page.keyboard.press("Escape")


def test_a_patient_with_no_cause_gets_no_card(session):
    s = session("no-risk-factors-negative")
    s.add_services()
    s.page.get_by_text("No recommendations to display").wait_for(timeout=15000)
    s.page.wait_for_timeout(500)
    s.shot("no-card")
    assert s.cards().count() == 0
    assert s.responses and all(r["body"]["cards"] == [] for r in s.responses)


def _positive_card(session, patient_id: str = "glucocorticoids-positive") -> tuple[Session, object, dict]:
    """A glucocorticoids-positive patient's card: the tab, the rendered card and the card as sent."""
    s = session(patient_id)
    s.add_services()
    card = s.wait_for_card("Possible secondary osteoporosis")
    return s, card, s.last_card_from("secondary-osteoporosis")


def test_accepting_a_suggestion_stores_accepted_feedback(session, stack):
    s, card, sent = _positive_card(session)
    first = sent["suggestions"][0]
    with _feedback_posted(s) as posted:
        card.get_by_role("button", name=first["label"]).click()
    assert posted.value.status == 200
    s.shot("accepted")
    stored = stack["store"].entries_for_card(sent["uuid"])
    assert [(e["outcome"], e["acceptedSuggestions"]) for e in stored] == [("accepted", [first["uuid"]])]
    again = session("glucocorticoids-positive")              # acted on: the chart reopened is quiet (snoozed)
    with again.page.expect_response(lambda r: r.url.endswith("/cds-services/secondary-osteoporosis")
                                    and r.request.method == "POST", timeout=20000) as served:
        again.add_services()
    assert served.value.status == 200 and served.value.json()["cards"] == []


def test_dismissing_with_a_reason_stores_the_reason(session, stack):
    s, card, sent = _positive_card(session, "e2e-gc-dismiss")
    reason = sent["overrideReasons"][0]
    card.get_by_label("select dismiss reason").click()
    with _feedback_posted(s) as posted:
        s.page.get_by_role("menuitem", name=re.compile(re.escape(reason["display"]))).click()
    assert posted.value.status == 200
    s.shot("dismissed")
    stored = stack["store"].entries_for_card(sent["uuid"])
    assert [(e["outcome"], e["overrideCode"]) for e in stored] == [("overridden", reason["code"])]


def test_chart_text_with_urls_and_markdown_renders_as_text(session):
    s = session("e2e-injection")
    s.add_services()
    card = s.wait_for_card("Possible secondary osteoporosis")
    s.shot("injection")
    text = s.save_text(card)
    assert " ".join(INJECTION.split()) in " ".join(text.split())          # exactly as recorded
    hrefs = card.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    assert not [h for h in hrefs if h and "evil" in h]
    assert card.locator("b").count() == 0                                  # no HTML of the chart's own


# ---- prescribing -----------------------------------------------------------------------------------
def _order_prednisone(s: Session) -> None:
    page = s.page
    page.fill("input[name=medication-input]", "prednisone")
    page.get_by_text("Prednisone 10 MG Oral Tablet", exact=True).click()
    dates = page.locator("input[placeholder='MM/DD/YYYY']")
    dates.nth(0).click()
    dates.nth(0).type("06302026")
    dates.nth(1).click()
    dates.nth(1).type("09282026")


def test_rx_view_gets_the_order_select_card(session):
    s = session("no-risk-factors-negative")
    s.add_services()
    s.page.get_by_text("Rx View").click()
    _order_prednisone(s)
    card = s.wait_for_card("Prednisone 10 mg daily for 3 months: protect bone (ACR 2022)")
    s.shot("rx-view")
    text = s.save_text(card)
    assert "Ordering: Prednisone 10 mg daily for 3 months" in text
    assert card.get_by_role("button", name="Calcium and vitamin D supplement").is_visible()


def test_rx_sign_gets_the_order_sign_card(session):
    s = session("e2e-rx-sign")
    s.add_services()
    s.page.get_by_text("Rx Sign").click()
    _order_prednisone(s)
    s.page.get_by_role("button", name=re.compile("Sign Order", re.I)).click()
    card = s.wait_for_card("Prednisone 10 mg daily for 3 months: protect bone (ACR 2022)")
    s.shot("rx-sign")
    s.save_text(card)
    assert any(r["url"].endswith("/bone-protection-order-sign") and r["body"]["cards"] for r in s.responses)


def test_a_draft_shown_at_order_select_gets_no_second_card_at_order_sign(session):
    """Issue 19: one card per draft across order-select and order-sign."""
    s = session("e2e-rx-both")
    s.add_services()
    s.page.get_by_text("Rx View").click()
    _order_prednisone(s)
    s.wait_for_card("Prednisone 10 mg daily for 3 months: protect bone (ACR 2022)")
    s.page.get_by_text("Rx Sign").click()
    _order_prednisone(s)
    s.page.get_by_role("button", name=re.compile("Sign Order", re.I)).click()
    s.page.wait_for_timeout(1500)
    signed = [r for r in s.responses if r["url"].endswith("/bone-protection-order-sign")]
    assert signed and all(r["body"]["cards"] == [] for r in signed)
