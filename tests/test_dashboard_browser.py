"""The dashboard in a real browser: Debian's Chromium, headless, driven through chromedriver
(Selenium), over a real store that `fedpeft simulate` fills: a finished run with its baselines,
then a second run watched while it trains. Each page's numbers are checked against the store,
and each page is saved as a screenshot (``FEDPEFT_SCREENSHOTS``, default build/dashboard-
screenshots/).

Needs ``chromium`` and ``chromium-driver`` (apt-get); .ci/run installs them and sets
``FEDPEFT_TEST_BROWSER=1``, under which a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpeft.common.data import data_fingerprint, heart_sites
from fedpeft.common.environment import QUIET
from fedpeft.server.rounds import delivered_round
from fedpeft.server.store import RunStore, open_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("FEDPEFT_SCREENSHOTS", ROOT / "build" / "dashboard-screenshots"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
#: Bounds on the waits: a simulation of heart on 2 CPU cores takes about a minute.
SIMULATION_S, ROUND_S = 900, 600

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("FEDPEFT_TEST_BROWSER"):
        raise RuntimeError("FEDPEFT_TEST_BROWSER is set but chromium or chromedriver is missing")
    pytest.skip(
        "needs chromium and chromium-driver (.ci/run installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402  (only with a browser to drive)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, **QUIET}


def _simulate(db: str, tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    log = (tmp / f"simulate-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "fedpeft", "simulate", "--db", db, "--plot", str(tmp / "p.png")]
        + list(args),
        cwd=tmp,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard")


@pytest.fixture(scope="module")
def db(tmp: Path) -> str:
    """A store holding one finished run of heart, with its alone and centralized baselines."""
    url = f"sqlite:///{tmp / 'runs.db'}"
    # Logged to MLflow as well (simulate --mlflow): test_simulate_logged_the_run_to_mlflow.
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    finished = _simulate(
        url, tmp, "--rounds", "2", "--lr-grid", "0.005", "--seed", "0", "--mlflow", tracking
    )
    assert finished.wait(SIMULATION_S) == 0, "the first simulation failed"
    return url


@pytest.fixture(scope="module")
def store(db: str) -> Iterator[RunStore]:
    s = open_store(db, create=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def base_url(db: str, tmp: Path) -> Iterator[str]:
    """`fedpeft dashboard` on 127.0.0.1, stopped (by its PID) when the module is done."""
    port = _free_port()
    log = (tmp / "dashboard.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpeft", "dashboard", "--db", db, "--port", str(port)],
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "dashboard.log").read_text()) from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shot(browser: webdriver.Chrome, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    # The whole page: grow the window to the document's height first.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1200, max(900, min(int(height) + 40, 6000)))
    assert browser.save_screenshot(str(path)), path
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def _texts(browser: webdriver.Chrome, css: str) -> list[str]:
    return [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, css)]


def _f3(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def test_runs_page(browser: webdriver.Chrome, base_url: str, store: RunStore) -> None:
    browser.get(base_url + "/")
    run = store.get_run()
    delivered = delivered_round(store.rounds(run.id))
    assert delivered is not None
    row = f'#runs tr[data-run="{run.id}"]'
    assert _texts(browser, row + " .status") == ["finished"]
    assert _texts(browser, row + " .delivered") == [str(delivered.round)]
    assert _texts(browser, row + " .auc") == [_f3(delivered.pooled_auc)]
    _shot(browser, "1-runs")


def test_finished_run_page(browser: webdriver.Chrome, base_url: str, store: RunStore) -> None:
    run = store.get_run()
    browser.get(f"{base_url}/runs/{run.id}")
    rounds = store.rounds(run.id)
    assert _texts(browser, "#rounds .pooled-auc") == [_f3(r.pooled_auc) for r in rounds]
    delivered = delivered_round(rounds)
    assert delivered is not None
    evals = {
        r.site: r.auc
        for r in store.site_results(run.id)
        if r.phase == "evaluate" and r.round == delivered.round and r.status == "ok"
    }
    assert len(evals) == 4  # the four heart hospitals
    baselines = {(b.kind, b.site): b.auc for b in store.baselines(run.id)}
    for site, auc in evals.items():
        row = f'#sites tr[data-site="{site}"]'
        assert _texts(browser, row + " .federated") == [_f3(auc)], site
        assert _texts(browser, row + " .alone") == [_f3(baselines[("alone", site)])], site
        central = baselines[("centralized", site)]
        assert _texts(browser, row + " .centralized") == [_f3(central)], site
    for r in store.site_results(run.id):  # every site's AUC in every round, with its interval
        if r.phase == "evaluate" and r.status == "ok":
            cell = f'#site-aucs tr[data-round="{r.round}"] td.site-auc[data-site="{r.site}"]'
            low, high = r.extra["auc-low"], r.extra["auc-high"]
            assert _texts(browser, cell) == [f"{_f3(r.auc)} [{low:.3f}, {high:.3f}]"], cell
    uploads = {
        (r.round, r.site): r.bytes_up for r in store.site_results(run.id) if r.phase == "train"
    }
    for (rnd, site), nbytes in uploads.items():
        cell = f'#traffic tr[data-round="{rnd}"] td.bytes[data-site="{site}"]'
        assert _texts(browser, cell) == [f"{nbytes:,}"], (rnd, site)
    # The chart: one point per site per round, and the baselines' macro AUCs as lines.
    points = browser.find_elements(By.CSS_SELECTOR, "svg.chart circle.point")
    assert len(points) >= 4 * len(rounds)
    alone = [baselines[("alone", s)] for s in evals]
    refs = {
        e.get_attribute("data-label"): float(e.get_attribute("data-y") or "nan")
        for e in browser.find_elements(By.CSS_SELECTOR, "svg.chart line.reference")
    }
    assert refs["alone (macro)"] == pytest.approx(sum(a for a in alone if a) / len(alone), 1e-5)
    assert "off: the coordinator opens each site's delta" in browser.page_source
    _shot(browser, "2-run-finished")


def test_simulate_logged_the_run_to_mlflow(store: RunStore, tmp: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedpeft")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "pooled_auc")
    logged = {m.step: m.value for m in history}
    assert logged == {r.round: r.pooled_auc for r in store.rounds(store.get_run().id)}
    files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in files and "adapter/README.md" in files
    assert (tmp / "mlflow-artifacts").is_dir()  # beside the tracking database


def test_model_card_page(browser: webdriver.Chrome, base_url: str, store: RunStore) -> None:
    run = store.get_run()
    browser.get(f"{base_url}/runs/{run.id}")
    browser.find_element(By.ID, "card-link").click()
    WebDriverWait(browser, 30).until(lambda b: b.current_url.endswith("/card"))
    results = store.site_results(run.id)
    for rnd in store.rounds(run.id):
        used = sorted(
            r.site
            for r in results
            if r.round == rnd.round and r.phase == "train" and r.status == "ok"
        )
        cell = f'#card-lineage tr[data-round="{rnd.round}"] .contributed'
        assert _texts(browser, cell) == [", ".join(used)], rnd.round
    # Each site's data fingerprint went from the site, through the store, to the card: it is
    # the hash of the rows the simulation gave that site.
    expected = {site.name: data_fingerprint(site) for site in heart_sites()}
    stored = {r.site: r.data_fingerprint for r in results if r.phase == "train"}
    assert stored == expected
    for site, fingerprint in expected.items():
        assert _texts(browser, f'#card-sites tr[data-site="{site}"] .fingerprint') == [fingerprint]
    _shot(browser, "3-model-card")


def test_site_page(browser: webdriver.Chrome, base_url: str, store: RunStore) -> None:
    run = store.get_run()
    browser.get(f"{base_url}/runs/{run.id}")
    browser.find_element(By.LINK_TEXT, "Cleveland").click()  # from the run's site table
    WebDriverWait(browser, 30).until(lambda b: "/sites/Cleveland" in b.current_url)
    rounds = store.rounds(run.id)
    delivered = delivered_round(rounds)
    assert delivered is not None
    results = [r for r in store.site_results(run.id) if r.site == "Cleveland"]
    auc = next(r.auc for r in results if r.phase == "evaluate" and r.round == delivered.round)
    row = f'#site-runs tr[data-run="{run.id}"]'
    assert _texts(browser, row + " .auc") == [_f3(auc)]
    trained = sum(1 for r in results if r.phase == "train" and r.status == "ok")
    assert _texts(browser, row + " .trained") == [str(trained)]
    _shot(browser, "4-site")


def test_a_running_runs_page_shows_rounds_as_they_land(
    browser: webdriver.Chrome, base_url: str, db: str, store: RunStore, tmp: Path
) -> None:
    first = store.get_run().id
    proc = _simulate(db, tmp, "--rounds", "3", "--baselines", "none", "--seed", "1")
    try:
        deadline = time.monotonic() + SIMULATION_S
        while store.get_run().id == first:  # until the new run is recorded
            assert proc.poll() is None, "the second simulation ended before it recorded its run"
            assert time.monotonic() < deadline
            time.sleep(0.5)
        run = store.get_run().id
        browser.get(f"{base_url}/runs/{run}")
        assert _texts(browser, "#run-status") == ["running"]
        # A mark that a reload would wipe: the rounds must appear on this very page.
        browser.execute_script("window.fedpeftMark = 'no reload';")
        shown = len(browser.find_elements(By.CSS_SELECTOR, "#rounds tr[data-round]"))
        assert shown < 3, "the run had finished before its page was opened"
        WebDriverWait(browser, ROUND_S, poll_frequency=1).until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, "#rounds tr[data-round]")) > shown
        )
        assert browser.execute_script("return window.fedpeftMark") == "no reload"
        landed = {r.round: r for r in store.rounds(run)}
        for row in browser.find_elements(By.CSS_SELECTOR, "#rounds tr[data-round]"):
            number = int(row.get_attribute("data-round") or 0)
            cell = row.find_element(By.CSS_SELECTOR, ".pooled-auc").text.strip()
            assert cell == _f3(landed[number].pooled_auc), number
        _shot(browser, "5-run-running")
        assert proc.wait(SIMULATION_S) == 0, "the second simulation failed"
        WebDriverWait(browser, 60, poll_frequency=1).until(
            lambda b: _texts(b, "#run-status") == ["finished"]
        )
        assert browser.execute_script("return window.fedpeftMark") == "no reload"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#rounds tr[data-round]")) == len(
            store.rounds(run)
        )
        _shot(browser, "6-run-finished-live")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_compare_page(browser: webdriver.Chrome, base_url: str, store: RunStore) -> None:
    runs = sorted(r.id for r in store.list_runs())
    assert len(runs) == 2, "the running-run test records the second run"
    browser.get(f"{base_url}/compare")
    browser.find_element(By.CSS_SELECTOR, "form button").click()  # the picker's first two runs
    WebDriverWait(browser, 30).until(lambda b: "a=" in b.current_url)
    a, b = (
        int(x.split("=")[1]) for x in browser.current_url.split("?")[1].split("&")
    )  # as the form sent them
    assert {a, b} == set(runs)
    for col, run in (("a", a), ("b", b)):
        delivered = delivered_round(store.rounds(run))
        assert delivered is not None
        assert _texts(browser, f"#compare-summary tr.pooled td.{col}") == [
            _f3(delivered.pooled_auc)
        ]
    diff = browser.find_element(By.ID, "config-diff").text
    assert "federation.rounds" in diff and "seed" in diff
    _shot(browser, "7-compare")
