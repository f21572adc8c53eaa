"""The dispute explorer (``/explorer/``): its files are served with their media types and
strict headers, its pages reflect nothing of the URL, its script never builds markup from data,
the record of a dispute (``GET /v1/disputes/{id}/record``) carries the bisection, the proof and
its on-chain check, the ledger and the checked transcript (a tampered one fails), and, in
headless Chromium against a real server on loopback, the pages render it, hostile strings as
text.

:func:`browse_dispute` is also run at the end of a real-stack dispute
(``tests/test_dispute_stack.py``); screenshots go to ``out/explorer-screenshots/`` (printed).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import select

from challenge.fakes import FakeChain
from challenge.orchestrator import load_transcript, open_dispute, prove_pending
from challenge.records import Dispute, TranscriptEvent
from tests.dispute_world import World, add_result, make_world
from verifier.accounts import add_api_key
from verifier.api.app import create_app
from verifier.explorer import STATIC

ROOT = Path(__file__).resolve().parents[1]
#: Where the browser tests keep their screenshots (test artifacts).
SCREENSHOTS = ROOT / "out" / "explorer-screenshots"
#: How long the browser may take to start, load a page or render it (s).
BROWSER_TIMEOUT_S = 60
HOSTILE = '<img src=x onerror="document.title=\'pwned\'">&lt;b&gt;</td><script>x()</script>'
#: A hostile dispute id, for URLs (a ``/`` would split the path).
HOSTILE_ID = quote('<img src=x onerror="document.title=\'pwned\'"><b>&amp;', safe="")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The service on the fakes (a dispute in milliseconds)."""
    return make_world(tmp_path_factory.mktemp("explorer"), network_id="net_x",
                      model_id="mdl_x", ezkl=False)


def _settle(world: World) -> str:
    """A dispute the watcher played against a lie at state 2 and the (fake) proof settled."""
    rid = add_result(world, seed=1, lie_at=2)
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=10,
                              now=datetime.now(UTC))
    prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    return dispute_id


@pytest.fixture(scope="module")
def settled(world: World) -> str:
    """A dispute settled by a proof checked on no chain (none is configured)."""
    return _settle(world)


@pytest.fixture(scope="module")
def chained(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, FakeChain, str]:
    """A world whose proofs are verified again on a (fake) chain, and a dispute settled there."""
    chain = FakeChain()
    world = make_world(tmp_path_factory.mktemp("explorer-chain"), network_id="net_c",
                       model_id="mdl_c", ezkl=False, chain=chain)
    return world, chain, _settle(world)


def test_files_are_served_with_their_types_and_strict_headers(world: World) -> None:
    client = TestClient(create_app(world.ctx))
    for name, media_type in STATIC.items():
        answer = client.get(f"/explorer/static/{name}")
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == media_type
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert client.get("/explorer/").headers["content-type"].startswith("text/html")
    assert client.get("/explorer", follow_redirects=False).headers["location"] == "/explorer/"
    assert client.get("/explorer/static/..%2Fapp.py").status_code == 404
    assert client.get("/explorer/static/record.py").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/explorer") for p in paths)
    assert {"/v1/disputes", "/v1/disputes/{dispute_id}/record"} <= set(paths)


def test_pages_reflect_nothing_and_the_script_builds_no_markup(world: World) -> None:
    client = TestClient(create_app(world.ctx))
    page = client.get("/explorer/disputes/" + HOSTILE_ID)
    assert page.status_code == 200
    assert page.content == client.get("/explorer/static/dispute.html").content
    script = client.get("/explorer/static/explorer.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in script, sink
    assert "X-API-Key" in script and "sessionStorage" in script


def test_the_record_has_the_bisection_the_proof_the_ledger_and_a_checked_transcript(
        world: World, settled: str) -> None:
    client = TestClient(create_app(world.ctx))
    answer = client.get(f"/v1/disputes/{settled}/record")
    assert answer.status_code == 200, answer.text
    record: dict[str, Any] = answer.json()
    assert record["dispute"]["verdict"] == "PROVIDER_FAULT"
    timeline = record["timeline"]
    kinds = [e["kind"] for e in timeline]
    assert kinds[0] == "challenge" and kinds[-2:] == ["proofoutcome", "verdict"]
    answers = [e for e in timeline if e["kind"] == "answer"]
    assert answers and answers[-1]["round"] == len(answers)
    assert (timeline[-1]["lo"], timeline[-1]["hi"]) == (1, 2)
    reveals = [e for e in timeline if e["kind"] == "reveal"]
    assert all(e["leaf"] == record["result"]["leaves"][e["state"]] for e in reveals)
    (proof,) = record["proofs"]
    assert proof["kind"] == "step" and proof["step"] == 2 and proof["chain"] is None
    assert record["ledger"] and any(e["this_dispute"] for e in record["ledger"])
    transcript = record["transcript"]
    assert transcript["ok"] and transcript["signature"], transcript
    assert {c["name"] for c in transcript["checks"]} >= {"chain", "head", "signature"}
    assert client.get("/v1/disputes/dsp_nope/record").status_code == 404


def test_the_record_carries_the_on_chain_check_of_the_proof(
        chained: tuple[World, FakeChain, str]) -> None:
    world, chain, dispute_id = chained
    record = TestClient(create_app(world.ctx)).get(f"/v1/disputes/{dispute_id}/record").json()
    (proof,) = record["proofs"]
    assert len(chain.verified) == 1  # the orchestrator verified the proof on the chain port
    with world.ctx.sessions() as session:
        events = load_transcript(session, record["result"]["id"]).events
    (outcome,) = [e.body for e in events if e.kind == "proofoutcome"]
    assert proof["chain"] == outcome["chain"]  # what the transcript recorded, as it recorded it
    assert proof["chain"]["gas"] == chain.gas and proof["chain"]["contract"] == "0x" + "00" * 20
    assert proof["chain"]["tx"].startswith("0x") and len(proof["chain"]["tx"]) == 66
    assert record["transcript"]["ok"]


def test_a_tampered_transcript_fails_its_check(world: World) -> None:
    rid = add_result(world, seed=2, lie_at=1)
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=10,
                              now=datetime.now(UTC))
    with world.ctx.sessions() as s, s.begin():
        row = s.scalars(select(TranscriptEvent).where(TranscriptEvent.result_id == rid)
                        .order_by(TranscriptEvent.seq)).first()
        assert row is not None
        row.event = {**row.event, "at": float(row.event["at"]) + 1}  # type: ignore[arg-type]
    record = TestClient(create_app(world.ctx)).get(f"/v1/disputes/{dispute_id}/record").json()
    assert not record["transcript"]["ok"]
    chain = next(c for c in record["transcript"]["checks"] if c["name"] == "chain")
    assert not chain["ok"] and chain["seq"] == 0


def test_a_network_lists_its_disputes_with_its_key(world: World, settled: str) -> None:
    with world.ctx.sessions() as s, s.begin():
        key = add_api_key(s, world.network_id, datetime.now(UTC))
    client = TestClient(create_app(world.ctx))
    assert client.get("/v1/disputes").status_code == 401
    listed = client.get("/v1/disputes", headers={"X-API-Key": key}).json()
    assert settled in {d["id"] for d in listed}


# --- the browser ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _serve(world: World) -> Iterator[str]:
    """The API over ``world`` on a loopback port, in a thread, stopped on exit."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(world.ctx), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium,
    bound in time and always quit. Skips when they are not installed (``scripts/bootstrap``
    installs them)."""
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromium-driver are not installed (scripts/bootstrap)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--disable-component-update", "--window-size=1280,2400",
                "--remote-debugging-address=127.0.0.1", "--proxy-server=direct://",
                "--proxy-bypass-list=*",
                # nothing but loopback resolves: the pages need no other host
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    service = Service(executable_path=driver_path, service_args=["--allowed-ips=127.0.0.1"])
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(BROWSER_TIMEOUT_S)
        driver.set_script_timeout(BROWSER_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


def _text(driver: Any, css: str, expected: str) -> str:
    """The text of ``css`` once it contains ``expected`` (waits up to the browser timeout)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, BROWSER_TIMEOUT_S).until(
        lambda d: expected in d.find_element(By.CSS_SELECTOR, css).text)
    text: str = driver.find_element(By.CSS_SELECTOR, css).text
    return text


def _shot(driver: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"explorer screenshot: {path}")
    return path


def browse_dispute(base_url: str, dispute_id: str, *, api_key: str, verdict: str, step: int,
                   name: str, chain: Mapping[str, Any] | None = None) -> None:
    """Open the explorer on ``base_url`` in headless Chromium: the network page (with
    ``api_key``) lists the dispute, its page shows ``verdict``, ``step``, the bisection rounds,
    the ledger and "transcript verified"; screenshots of both pages are kept. With ``chain``
    (the on-chain check recorded with the proof: ``contract``, ``tx``, ``gas``), the proofs
    section shows it: "verified on chain", the gas, the transaction and the contract."""
    from selenium.webdriver.common.by import By

    with chromium() as driver:
        driver.get(f"{base_url}/explorer/")
        driver.find_element(By.ID, "api-key").send_keys(api_key)
        driver.find_element(By.ID, "key-submit").click()
        _text(driver, "#disputes tbody", dispute_id)
        assert api_key not in driver.current_url
        _shot(driver, f"{name}-network")
        driver.find_element(By.LINK_TEXT, dispute_id).click()
        assert _text(driver, "#verdict", verdict) == verdict
        assert _text(driver, "#transcript-status", "verified") == "transcript verified"
        assert f"step {step}" in _text(driver, "#summary", "step")
        timeline = _text(driver, "#timeline tbody", "verdict")
        assert "disagreed with" in timeline or "agreed with" in timeline
        assert "proved step" in timeline
        assert f"step{step}" in _text(driver, "#proofs", "maxdiff").replace(" ", "").replace(
            "\n", "")
        assert "bond" in _text(driver, "#ledger tbody", "bond")
        if chain is not None:
            shown = _text(driver, "#proofs", "verified on chain")
            assert f"gas\n{chain['gas']:,}" in shown, shown
            assert f"transaction\n{chain['tx']}" in shown, shown
            assert f"verifier contract\n{chain['contract']}" in shown, shown
            assert "not checked on chain" not in shown
        _shot(driver, f"{name}-dispute")


def test_the_pages_in_chromium_show_the_dispute_and_hostile_strings_as_text(
        world: World, settled: str) -> None:
    from selenium.webdriver.common.by import By

    with world.ctx.sessions() as s, s.begin():
        key = add_api_key(s, world.network_id, datetime.now(UTC))
        dispute = s.get(Dispute, settled)
        assert dispute is not None
        dispute.challenger = HOSTILE  # stored values reach the page as text, nothing more
    with _serve(world) as url:
        browse_dispute(url, settled, api_key=key, verdict="PROVIDER_FAULT", step=2,
                       name="fake-world")
        with chromium() as driver:
            driver.get(f"{url}/explorer/disputes/{settled}")
            assert HOSTILE in _text(driver, "#summary", "challenger")
            driver.get(f"{url}/explorer/disputes/" + HOSTILE_ID)
            assert "not found" in _text(driver, "#status", "Cannot load")
            assert driver.title != "pwned"
            assert not driver.find_elements(By.CSS_SELECTOR, "main img, main script, main b")
            _shot(driver, "fake-world-hostile")
            driver.get(f"{url}/explorer/disputes/{settled}")
            assert "not checked on chain" in _text(driver, "#proofs", "on-chain check")


def test_the_dispute_page_in_chromium_shows_the_on_chain_check(
        chained: tuple[World, FakeChain, str]) -> None:
    world, _, dispute_id = chained
    with world.ctx.sessions() as s, s.begin():
        key = add_api_key(s, world.network_id, datetime.now(UTC))
    record = TestClient(create_app(world.ctx)).get(f"/v1/disputes/{dispute_id}/record").json()
    with _serve(world) as url:
        browse_dispute(url, dispute_id, api_key=key, verdict="PROVIDER_FAULT", step=2,
                       name="fake-chain", chain=record["proofs"][0]["chain"])
