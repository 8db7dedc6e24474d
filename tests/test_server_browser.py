"""The page of `scatlas serve` in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
the server runs as the command (`python -m scatlas serve`, a token in SCATLAS_TOKEN); the page asks for the token,
shows the atlas, uploads a query to annotate, waits for the job, shows the summary, the histogram and the query on
the atlas map, and downloads the predictions; a predicate reading a file is refused on the page. A screenshot is
kept under pytest's tmp dir and, when SCATLAS_SCREENSHOT_DIR is set, there too."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata
import httpx
import pandas as pd
import pytest

from tests.test_server import TOKEN, free_port

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def _which(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in extra if Path(p).is_file()), None)


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    chromium = _which(CHROMIUM, ("/usr/lib/chromium/chromium",))
    driver = _which(DRIVER, ("/usr/lib/chromium/chromedriver",))
    if chromium is None or driver is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
                    "`make browser` does it as root)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    return chromium, driver


@pytest.fixture(scope="module")
def served(planted_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
           browser_paths: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """`scatlas serve` as a subprocess on a free port of 127.0.0.1, serving the planted world (conftest.py)."""
    with serving(planted_world["index"], tmp_path_factory.mktemp("serve_log") / "serve.log") as url:
        yield {"url": url, "world": planted_world}


@contextlib.contextmanager
def serving(index: Path, log: Path) -> Iterator[str]:
    """`scatlas serve --index INDEX` as a subprocess on a free port of 127.0.0.1 (its output in ``log``); yields its
    URL; no traceback may be logged."""
    port = free_port()
    env = {**os.environ, "SCATLAS_TOKEN": TOKEN}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scatlas", "serve", "--index", str(index), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"scatlas serve exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"scatlas serve did not answer: {log.read_text()[-3000:]}"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture()
def driver(browser_paths: tuple[str, str], tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    chromium, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,2200", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    browser.downloads = downloads
    try:
        yield browser
    finally:
        browser.quit()


def _wait(condition: Any, timeout: float = 120.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _loaded(browser: Any, selector: str) -> bool:
    return bool(browser.execute_script(
        "const img = document.querySelector(arguments[0]); return !!img && img.complete && img.naturalWidth > 0;",
        selector))


def test_annotate_a_query_in_the_page(served: dict[str, Any], driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(served["url"] + "/")
    token_input = _wait(lambda: driver.find_element(By.ID, "token-input").is_displayed() and
                        driver.find_element(By.ID, "token-input"), 30, "the token form")
    token_input.send_keys("not-the-token-at-all")
    driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
    _wait(lambda: "not accepted" in driver.find_element(By.ID, "token-error").text, 30, "the refused token")
    driver.find_element(By.ID, "token-input").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#token-form button").click()

    # the atlas: its datasets with their labels, and its map
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#datasets-table tbody tr")) == 2, 60, "the datasets")
    assert "cells in 2 dataset(s)" in driver.find_element(By.ID, "overview-line").text
    assert "norn cell" in driver.find_element(By.ID, "datasets-table").text
    _wait(lambda: _loaded(driver, "#atlas-map"), 60, "the atlas map")

    # a predicate that reads a file is refused, on the page
    panel = driver.find_element(By.ID, "annotate")
    query = served["world"]["query"]
    panel.find_element(By.NAME, "file").send_keys(str(query))
    where = panel.find_element(By.NAME, "where")
    where.send_keys("read_csv('/etc/passwd') IS NOT NULL")
    panel.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    error = _wait(lambda: panel.find_element(By.CSS_SELECTOR, ".error").is_displayed() and
                  panel.find_element(By.CSS_SELECTOR, ".error").text, 60, "the refusal")
    assert "read_csv() is not allowed" in error and "root:" not in error

    # the query annotated: progress, summary, histogram, the query on the map, downloads
    where.clear()
    panel.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(lambda: panel.get_attribute("data-done") == "true", 180, "the annotate job")
    summary = panel.find_element(By.CSS_SELECTOR, ".summary").text
    n = anndata.read_h5ad(query, backed="r").n_obs
    assert f"{n:,} cells annotated" in summary and "cell_type: unknown" in summary and "norn cell" in summary
    assert float(panel.find_element(By.TAG_NAME, "progress").get_attribute("value")) == 1.0
    assert len(panel.find_elements(By.CSS_SELECTOR, ".histogram svg rect")) == 20
    _wait(lambda: _loaded(driver, "#annotate .job-map"), 60, "the query on the atlas map")

    shot = tmp_path / "server.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG")
    keep = os.environ.get("SCATLAS_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "server.png")

    panel.find_element(By.CSS_SELECTOR, 'a[data-file="predictions.csv"]').click()
    saved = driver.downloads / "predictions.csv"
    _wait(lambda: saved.is_file() and not list(driver.downloads.glob("*.crdownload")), 60, "the download")
    predictions = pd.read_csv(saved)
    assert predictions.columns[0] == "cell" and len(predictions) == n
    assert predictions["cell"].astype(str).tolist() == anndata.read_h5ad(query, backed="r").obs_names.tolist()


def test_the_page_says_when_a_newer_build_is_on_disk(planted_world: dict[str, Path], browser_paths: tuple[str, str],
                                                     driver: Any, tmp_path: Path) -> None:
    """docs/server.md: until a restart, the page warns that the index on disk is newer than the one served."""
    import json

    from selenium.webdriver.common.by import By

    index = tmp_path / "index"
    shutil.copytree(planted_world["index"], index)
    with serving(index, tmp_path / "serve.log") as url:
        manifest = json.loads((index / "manifest.json").read_text())
        (index / "manifest.json").write_text(json.dumps({**manifest, "rebuilt": True}))  # as build --overwrite
        driver.get(url + "/")
        _wait(lambda: driver.find_element(By.ID, "token-input").is_displayed(), 30, "the token form")
        driver.find_element(By.ID, "token-input").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
        _wait(lambda: "rebuilt after the server started" in driver.find_element(By.ID, "overview-warnings").text,
              60, "the warning of a newer build on disk")


def test_a_queued_job_is_cancelled_from_the_page(planted_world: dict[str, Path], browser_paths: tuple[str, str],
                                                 driver: Any, tmp_path: Path) -> None:
    """docs/server.md: the page's Cancel button drops a job (here a queued one: the only worker is held by a job
    that waits for the test, so nothing depends on timing)."""
    import threading

    from selenium.webdriver.common.by import By

    from scatlas.server import create_app
    from tests.test_server import running

    app = create_app(planted_world["index"], token=TOKEN, work_dir=tmp_path / "work", workers=1)
    with running(app) as url:
        jobs = app.state.scatlas.jobs
        release = threading.Event()
        holder = jobs.new_job("annotate")
        jobs.submit(holder, lambda job: (release.wait(120), {})[1])
        try:
            driver.get(url + "/")
            _wait(lambda: driver.find_element(By.ID, "token-input").is_displayed(), 30, "the token form")
            driver.find_element(By.ID, "token-input").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
            panel = driver.find_element(By.ID, "annotate")
            panel.find_element(By.NAME, "file").send_keys(str(planted_world["query"]))
            panel.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            line = panel.find_element(By.CSS_SELECTOR, ".job-line")
            _wait(lambda: "annotate job queued" in line.text, 60, "the queued job")
            cancel = panel.find_element(By.CSS_SELECTOR, "button.cancel")
            assert cancel.is_displayed()
            cancel.click()
            _wait(lambda: "annotate job cancelled" in line.text, 60, "the cancelled job")
            assert not cancel.is_displayed()
            assert panel.find_element(By.CSS_SELECTOR, "button[type=submit]").is_enabled()
            assert jobs.counts()["cancelled"] == 1 and len(list((tmp_path / "work" / "jobs").iterdir())) == 1
        finally:
            release.set()
