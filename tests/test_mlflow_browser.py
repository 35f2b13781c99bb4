"""A finished smoke comparison in MLflow's own UI, in a real headless Chromium: a real
``mlflow server`` on loopback serves the comparison's SQLite store and artifacts; the experiment
page, filtered with docs/sampling.md's ``tags.ddpt.role = 'method'``, lists the method runs;
selecting them and pressing Compare opens MLflow's compare-runs page, whose metric table holds every
method's values side by side. Screenshots (PNG) go to ``$DDPT_TEST_ARTIFACTS`` (default
``<repo>/test-artifacts``), under ``mlflow_browser/``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them) and selenium
(the dev extra); nothing is downloaded, the browser talks to 127.0.0.1 only."""
from __future__ import annotations

import json
import math
import os
import signal
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import artifacts_dir, start_mlflow_server
from pipeline.tracking import ROLE_TAG, child_runs

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),  # the comparison, the server's and the UI's first loads: minutes
    pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                       reason=f"needs {CHROMIUM} and {CHROMEDRIVER}: `apt-get install chromium "
                              "chromium-driver` (make test's install step does)"),
]
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium: pip install -e '.[dev]' (make test does)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Three methods that need one trained prompt model (ddpt): about 30 s of CPU in this process.
METHODS = ("manual", "ddpt", "ddpt_ddim")
METHOD_FILTER = "tags.ddpt.role = 'method'"  # the filter docs/sampling.md documents
# Flags that work as root on a machine without network: no sandbox, no GPU, nothing phoned home.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1600,1000")
WAIT_S = 90  # the UI's first load on a busy 2-core machine takes 15-20 s
# The compare page's metric table (two react-virtualized grids: metric names, then values per
# run column) and its "Run Name:" row, read as {"names": [[top, left, text]], "values": [...],
# "runs": [name per column]}.
READ_COMPARE_TABLE = """
const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
const at = grids.findIndex(g => g.querySelector("a[title='Plot chart']"));
const cells = g => [...g.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
    .map(d => [parseFloat(d.style.top), parseFloat(d.style.left), d.textContent.trim()]);
const row = [...document.querySelectorAll('tr')]
    .find(tr => (tr.querySelector('th') || {}).textContent === 'Run Name:');
return {names: at < 0 ? [] : cells(grids[at]), values: at < 0 ? [] : cells(grids[at + 1]),
        runs: row ? [...row.querySelectorAll('td')].map(td => td.textContent.trim()) : []};
"""


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_group(pgid: int, what: str, grace_s: float = 30) -> None:
    """SIGTERM process group ``pgid`` (if still alive), SIGKILL what is left after ``grace_s``
    (with a warning); fail if anything survives that."""
    if group_members(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left := group_members(pgid):
        warnings.warn(f"{what}: processes {left} outlived SIGTERM by {grace_s} s; killed",
                      stacklevel=2)
        os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_members(pgid), f"{what}: {group_members(pgid)} survive SIGKILL"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> dict:
    """A finished smoke comparison, run in this process: the real pipeline (training, sampling,
    scoring, MLflow) on the tiny random model, no Ray."""
    from pipeline.config import build_config
    from pipeline.studies.main_job import run_main

    out = tmp_path_factory.mktemp("browser") / "run"
    config = build_config("smoke", overrides=["distributed.backend=local", "pool.backend=local"])
    run_main(config, out, methods=METHODS, progress=False)
    saved = json.loads((out / "mlflow_comparison.json").read_text())
    children = child_runs(saved["uri"], saved["run_id"])
    return {"out": out, "uri": saved["uri"], "parent": saved["run_id"],
            "experiment": children[0].info.experiment_id,
            "methods": {r.info.run_name: r for r in children if r.data.tags[ROLE_TAG] == "method"},
            "train": [r.info.run_name for r in children if r.data.tags[ROLE_TAG] == "train"]}


@pytest.fixture(scope="module")
def mlflow_ui(comparison):
    """``mlflow server`` on a free loopback port, its backend store the comparison's database,
    serving its artifacts; stopped (the whole process group) however the test ends."""
    out = comparison["out"]
    # No job runner: its eight huey consumers (for GenAI evaluation jobs) cost a 2-core machine
    # a core for half a minute at start and serve nothing here.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (out / "mlflow-server.log").open("w")
    server, base = start_mlflow_server(comparison["uri"], out / "mlartifacts", out, log, env,
                                       timeout=180)
    try:
        yield base
    finally:
        stop_group(server.pid, "mlflow server")
        server.wait(timeout=10)
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by Debian's chromedriver (its own process group, so that the
    browser's processes can be checked gone after ``quit``)."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"),
                      popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(service=service, options=options)
    pgid = service.process.pid
    try:
        yield driver
    finally:
        try:  # the page the test ended on, the first thing to look at when it fails
            driver.save_screenshot(str(artifacts_dir() / "mlflow_browser" / "last-page.png"))
        finally:
            driver.quit()
        stop_group(pgid, "chromedriver/chromium")


@pytest.fixture
def shots() -> Path:
    folder = artifacts_dir() / "mlflow_browser"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


def run_link(name: str) -> tuple[str, str]:
    """The runs table's link of run ``name``."""
    return By.XPATH, f"//div[@role='row']//a[normalize-space()='{name}']"


def select_method_runs(driver, base: str, comparison: dict, shots: Path) -> None:
    """The experiment page: filter to the method runs, expand the comparison, tick each method
    run, press Compare."""
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(f"{base}/#/experiments/{comparison['experiment']}/runs")
    box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid='search-box']")))
    for close in driver.find_elements(
            By.CSS_SELECTOR, "[data-component-id='mlflow.assistant.chat_panel.close']"):
        close.click()  # MLflow 3's assistant panel covers a third of the page
    box.send_keys(METHOD_FILTER, Keys.ENTER)
    # Child runs sit under their parent's row, collapsed: expand the comparison ("compare").
    wait.until(EC.element_to_be_clickable((
        By.XPATH, "//div[@role='row'][.//a[normalize-space()='compare']]"
                  "//button[contains(@data-component-id, 'runnamecellrenderer')]"))).click()
    for name in comparison["methods"]:
        wait.until(EC.visibility_of_element_located(run_link(name)))
    for name in comparison["train"]:  # the filter leaves the training runs out
        assert not driver.find_elements(*run_link(name)), f"{name} shown despite the filter"
    for name in comparison["methods"]:
        row = driver.find_element(By.XPATH, f"//div[@role='row'][.//a[normalize-space()='{name}']]")
        row.find_element(By.CSS_SELECTOR, "input.ag-checkbox-input").click()
    wait.until(lambda d: len(d.find_elements(
        By.CSS_SELECTOR, "div[role='row'] input.ag-checkbox-input:checked")) == len(METHODS))
    driver.save_screenshot(str(shots / "1-experiment-method-runs.png"))
    wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Compare']"))
               ).click()


def read_compare_table(driver) -> tuple[dict[str, list[str]], list[str]]:
    """{metric: [shown value per column]} and the run name per column of the compare page."""
    table = driver.execute_script(READ_COMPARE_TABLE)
    rows: dict[float, list] = {}
    for top, left, text in table["values"]:
        rows.setdefault(top, []).append((left, text))
    values = {name: [text for _, text in sorted(rows.get(top, []))]
              for top, _, name in table["names"]}
    return values, table["runs"]


def test_the_comparison_in_mlflow_ui(comparison, mlflow_ui, browser, shots):
    methods = comparison["methods"]
    assert sorted(methods) == sorted(METHODS) and comparison["train"] == ["train-ddpt"]
    # The documented filter, as the MLflow backend reads it: exactly the method runs.
    client = MlflowClient(comparison["uri"])
    found = client.search_runs([comparison["experiment"]], METHOD_FILTER)
    assert sorted(r.info.run_name for r in found) == sorted(METHODS)
    parent = client.get_run(comparison["parent"])  # the row the method runs sit under
    assert (parent.info.run_name, parent.data.tags[ROLE_TAG]) == ("compare", "comparison")

    select_method_runs(browser, mlflow_ui, comparison, shots)
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(EC.url_contains("#/compare-runs?runs="))
    wait.until(EC.text_to_be_present_in_element(
        (By.TAG_NAME, "h2"), f"Comparing {len(METHODS)} Runs from 1 Experiment"))
    shown = json.loads(urllib.parse.unquote(browser.current_url).split("runs=", 1)[1]
                       .split("&", 1)[0])
    assert sorted(shown) == sorted(r.info.run_id for r in methods.values())
    # The parallel-coordinates plot (plotly) draws last; the picture is better with it.
    wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot .main-svg")))
    browser.save_screenshot(str(shots / "2-compare-runs.png"))

    metric_names = set.intersection(*(set(r.data.metrics) for r in methods.values()))
    assert {"bleu4", "code_ce"} <= metric_names
    wait.until(lambda d: metric_names <= set(read_compare_table(d)[0]))
    values, columns = read_compare_table(browser)
    assert sorted(columns) == sorted(METHODS)  # one column per method run
    for metric in metric_names:  # each column holds that run's value (shown rounded)
        assert len(values[metric]) == len(columns), metric
        for name, text in zip(columns, values[metric]):
            stored = methods[name].data.metrics[metric]
            assert math.isclose(float(text), stored, rel_tol=1e-3, abs_tol=5e-4), \
                f"{metric} of {name}: page shows {text}, MLflow holds {stored}"
    browser.set_window_size(1600, 2600)  # the run names, parameters and metrics in one picture
    wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot .main-svg")))
    browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", browser.find_element(
        By.XPATH, "//a[@title='Plot chart'][normalize-space()='code_ce']"))
    browser.save_screenshot(str(shots / "3-compare-metrics.png"))


def test_the_server_serves_the_method_runs_artifacts(comparison, mlflow_ui):
    """What the run page's artifact view fetches: each method's samples, through the server."""
    for name, run in comparison["methods"].items():
        query = urllib.parse.urlencode({"path": "samples.json", "run_uuid": run.info.run_id})
        with urllib.request.urlopen(f"{mlflow_ui}/get-artifact?{query}", timeout=30) as answer:
            records = json.loads(answer.read())
        assert len(records) == 8 and {r["method"] for r in records} == {name}
