"""A real-browser check of notebook 03's quantization widget, in JupyterLab and headless Chromium.

The test starts JupyterLab on localhost over a copy of chapter 03's widget cells (the sources
are never opened by the server), opens it in Debian's Chromium driven by Playwright, runs the
cells, changes the controls (a click on "symmetric", the arrow key on the "bits" slider) and waits
for the figure to be redrawn each time. Screenshots go to test-artifacts/browser/ (or
$EDGELAB_ARTIFACTS). Chromium is installed with apt-get in the background when missing
(tests/prepare.py); the test is skipped, with the reason, only where no browser can be installed.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import prepare
import pytest

from edgelab import runner

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("EDGELAB_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the cells of notebook 03 the widget needs: parameters, setup, the weight `w`, draw(), the widget
WIDGET_CELLS = ("# Parameters", "import logging", "# NBVAL_CHECK_OUTPUT\nw = ", "calib = ", "control = widgets")


def _chromium() -> str:
    """Debian's Chromium: on PATH, or installed now or by bootstrap.py's background job; else skip."""
    cmd = prepare.chromium_install_command()
    if isinstance(cmd, str):
        pytest.skip(cmd)
    if cmd is not None:
        rc, log, _ = prepare.result("chromium", cmd)
        if rc != 0:
            pytest.skip(f"Chromium could not be installed with apt-get: {log.strip()[-300:]}")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    return path or pytest.skip("apt-get installed chromium but it is not on PATH")


def _widget_notebook(folder: Path) -> Path:
    """A copy of notebook 03 holding only the cells the widget needs, outputs cleared."""
    src = nbformat.read(runner.notebooks(["03"])[0], as_version=4)
    keep = [c for c in src.cells if c.cell_type == "code" and c.source.startswith(WIDGET_CELLS)]
    assert len(keep) == len(WIDGET_CELLS), "notebook 03 no longer has the widget's cells"
    for c in keep:
        c.outputs, c.execution_count = [], None
    src.cells = keep
    path = folder / "quantization_widget.ipynb"
    nbformat.write(src, path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab serving tmp_path on localhost; yields (url, token); stopped afterwards."""
    port, token = _free_port(), "edgelab-test"
    work = tmp_path / "lab"
    work.mkdir()
    _widget_notebook(work)
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--allow-root",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=True"],
        stdout=log, stderr=subprocess.STDOUT, cwd=work,
        env=dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt")))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-2000:])
                time.sleep(0.5)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _figure(page) -> str:
    """The src of the widget's figure (a PNG data URL): it changes when the figure is redrawn."""
    img = page.locator(".jp-OutputArea-output .widget-output img, .widget-interact img").last
    img.wait_for(state="visible", timeout=120_000)
    return img.get_attribute("src")


def _wait_redraw(page, before: str) -> str:
    deadline = time.time() + 60
    while time.time() < deadline:
        now = _figure(page)
        if now != before:
            return now
        page.wait_for_timeout(250)
    raise AssertionError("the figure was not redrawn after the control changed")


def test_quantization_widget_redraws_in_a_real_browser(jupyterlab, tmp_path):
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed by the test extra")
    url, token = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/quantization_widget.ipynb?token={token}", timeout=120_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
            page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=120_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            first = _figure(page)
            page.screenshot(path=str(ARTIFACTS / "notebook03_widget_before.png"))

            checkbox = page.locator(".widget-checkbox", has_text="symmetric").locator("input")
            checkbox.click()
            assert checkbox.is_checked()
            second = _wait_redraw(page, first)

            handle = page.locator(".widget-slider", has_text="bits").locator(".noUi-handle")
            handle.focus()
            page.keyboard.press("ArrowRight")
            readout = page.locator(".widget-slider", has_text="bits").locator(".widget-readout")
            page.wait_for_function("el => el.textContent.trim() === '5'", arg=readout.element_handle(), timeout=30_000)
            _wait_redraw(page, second)
            page.screenshot(path=str(ARTIFACTS / "notebook03_widget_after.png"))
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert "Traceback" not in " ".join(errors.all_inner_texts())
        finally:
            browser.close()
    assert (ARTIFACTS / "notebook03_widget_after.png").stat().st_size > 10_000
