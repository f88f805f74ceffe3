"""The reviewer's view: the MLflow UI, in a real headless Chromium, over a store made by real
`orchestrate` runs (a cnn_digits run with a registered model, and a sweep).

Chromium and ChromeDriver are Debian's (`make browser` installs them; `make test` does it
first). Screenshots of every page checked land in test-artifacts/mlflow-ui/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BIN, _free_port, run_cli, runs_of, terminate, tracking_uri

pytestmark = pytest.mark.slow
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "mlflow-ui"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_head):
    where = tmp_path_factory.mktemp("ui")
    common = ["trainer.num_workers=1", f"cluster.address={ray_head}"]
    single = run_cli(
        ["job=cnn_digits", "trainer.max_epochs=3", "tracking.register_as=digits_cnn", *common],
        where,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    sweep = run_cli(
        ["-m", "job=mlp_tabular", "trainer.max_epochs=2", "optim.lr=1e-3,3e-3,1e-2"]
        + ["sweep.search=grid", *common],
        where,
        timeout=900,
    )
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    runs = {r.info.run_name: r for r in runs_of(where)}
    return where, runs


@pytest.fixture(scope="module")
def server(store):
    where, _ = store
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", tracking_uri(where)]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=where,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (
                "mlflow server did not start"
            )
            time.sleep(0.5)
    yield url
    terminate(proc)


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Chromium and ChromeDriver are missing: run `make browser` (Debian packages)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(arg)
    options.add_argument("--disable-dev-shm-usage")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    shutil.rmtree(SHOTS, ignore_errors=True)  # only this session's screenshots
    SHOTS.mkdir(parents=True)
    yield driver
    driver.quit()


def show(driver, url: str, shot: str, *texts: str, timeout: float = 60) -> str:
    """Open `url`, wait until every text is on the page, screenshot it; the page's text."""
    if url:
        driver.get(url)
    deadline = time.monotonic() + timeout
    while True:
        body = driver.find_element("tag name", "body").text
        missing = [t for t in texts if t not in body]
        if not missing:
            break
        if time.monotonic() > deadline:
            driver.save_screenshot(str(SHOTS / f"FAILED-{shot}.png"))
            pytest.fail(f"{url or shot}: not shown after {timeout:.0f}s: {missing}")
        time.sleep(0.5)
    time.sleep(1)  # let charts finish drawing before the screenshot
    assert driver.save_screenshot(str(SHOTS / f"{shot}.png"))
    return body


def run_url(server: str, run) -> str:
    return f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def test_experiment_lists_readable_run_names_and_nests_the_sweeps_trials(store, server, browser):
    from selenium.webdriver.common.by import By

    _, runs = store
    single = runs["cnn_digits trainer.max_epochs=3 trainer.num_workers=1"]
    parent = runs["sweep mlp_tabular optim.lr"]
    trials = sorted(name for name in runs if name.startswith("trial "))
    assert len(trials) == 3 and all("optim.lr=" in t for t in trials)
    page = f"{server}/#/experiments/{single.info.experiment_id}/runs"
    body = show(browser, page, "1-experiment-runs", single.info.run_name, parent.info.run_name)
    assert not any(t in body for t in trials)  # collapsed under their parent
    row = browser.find_element(By.CSS_SELECTOR, f'[role=row][row-id="{parent.info.run_id}"]')
    row.find_element(By.CSS_SELECTOR, "button[data-component-id*=runnamecellrenderer]").click()
    show(browser, "", "2-sweep-trials-expanded", *trials)


def test_run_page_shows_how_to_reproduce_it_its_curves_and_its_plots(store, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, runs = store
    run = runs["cnn_digits trainer.max_epochs=3 trainer.num_workers=1"]
    commit = run.data.tags["mlflow.source.git.commit"]
    body = show(browser, run_url(server, run), "3-run-overview", "Reproduce with", commit)
    assert "orchestrate job=cnn_digits trainer.max_epochs=3" in body
    assert "trainer.num_workers" in body and "optim.lr" in body  # params, grouped by prefix
    # Charts come grouped by metric prefix (the page draws sections as they scroll into
    # view, so filter to each group): the main metric and the losses over steps.
    show(browser, run_url(server, run) + "/model-metrics", "4-run-charts", "baseline\n(1)")
    search = browser.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric charts']")
    search.send_keys("val/")
    show(browser, "", "5-run-val-charts", "val\n(2)", "Step", "(val/acc)", "(val/loss)")
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys("train/loss")
    show(browser, "", "6-run-train-loss-charts", "(train/loss)", "(train/loss_epoch)")
    show(
        browser,
        run_url(server, run) + "/artifacts",
        "7-run-artifacts",
        "confusion_matrix",
        "config.yaml",
    )
    browser.find_element(By.XPATH, "//*[text()='confusion_matrix']").click()
    show(browser, "", "8-confusion-matrix-folder", "epoch_003.png")
    browser.find_element(By.XPATH, "//*[text()='epoch_003.png']").click()
    show(browser, "", "9-confusion-matrix-image", "confusion_matrix/epoch_003.png")
    drawn = browser.execute_script(  # the PNG itself arrived and was decoded, not just its name
        "return [...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth > 100)"
    )
    assert drawn, "the confusion-matrix image was not drawn"


def test_registered_model_shows_its_version_with_the_champion_alias(store, server, browser):
    body = show(browser, f"{server}/#/models/digits_cnn", "10-registered-model", "Version 1")
    assert "@ champion" in body  # the alias, on the version row
