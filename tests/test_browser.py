"""Lectures 01-03 in a real JupyterLab, driven by a headless Chromium.

For each lecture the test starts from a copy of the committed notebook (the repository's copy is never opened, so a
save cannot touch it), runs all cells through JupyterLab's own Run menu in smoke mode, and checks in the page that

* no cell shows an error (no traceback in any output, and none in the notebook JupyterLab saves),
* every figure rendered: one ``img`` of non-zero size per PNG output the kernel produced,
* the ipywidgets controls rendered (sliders, no "Error displaying widget"), and moving one redraws its figure.

Screenshots of each lecture go to ``<tmp_path>/screenshots``. Needs Debian's ``chromium`` (``/usr/bin/chromium``),
the Playwright Python package and JupyterLab in the environment; skipped with the reason otherwise. It takes minutes
on 2 cores, so it is marked ``browser`` and runs only when asked for::

    NCA_KIT_SMOKE=1 python -m pytest tests/test_browser.py -m browser

CI (``.ci/run``) installs Chromium and runs it after ``make test NOTEBOOKS=full``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
LECTURES = ["01_dpo_to_infonca.ipynb", "02_nca.ipynb", "03_appendix_h_toy.ipynb"]
CHROMIUM = os.environ.get("NCA_KIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_TIMEOUT_S = 600  # one lecture, all cells, smoke mode, on a loaded 2-core machine

pytestmark = [pytest.mark.browser, pytest.mark.notebook]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Playwright Python package is not installed (pip install playwright)"
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        return "JupyterLab is not installed in this environment (make lab installs it)"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "ipywidgets is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    """A JupyterLab server on a free local port over a temporary copy of the lectures; yields (url, token, root)."""
    if "browser" not in (request.config.option.markexpr or ""):
        pytest.skip("takes minutes: run with -m browser")
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("lab")
    for name in LECTURES:
        shutil.copy(REPO / "notebooks" / name, root / name)
    settings = root / ".settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Render every cell (JupyterLab 4 otherwise only renders cells near the viewport) and do not autosave.
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    (root / ".settings" / "@jupyterlab" / "docmanager-extension").mkdir(parents=True)
    (root / ".settings" / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings").write_text(
        json.dumps({"autosave": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(root / ".settings"), NCA_KIT_SMOKE="1",
               NCA_KIT_OUT=str(root / "figures"), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                           os.environ.get("PYTHONPATH")])))
    env.pop("MPLBACKEND", None)
    log = open(root / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(root / 'jupyterlab.log').read_text()[-2000:]}")
                time.sleep(1)
        yield url, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


def _png_outputs(path: Path) -> int:
    nb = nbformat.read(str(path), as_version=4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _errors(path: Path) -> list[str]:
    nb = nbformat.read(str(path), as_version=4)
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]


@pytest.mark.parametrize("name", LECTURES, ids=[n.split("_")[0] for n in LECTURES])
def test_lecture_runs_in_jupyterlab(lab, browser, name, tmp_path):
    url, token, root = lab
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{url}/lab/tree/{name}?token={token}", wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=120_000)
        page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=120_000)
        started = time.monotonic()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        # Every code cell ends with a number in its prompt; "[*]" means queued or running.
        try:
            page.wait_for_function(
                """() => {
                    // Done when every code cell has run, or as soon as one shows an error (Run All stops there).
                    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
                    const failed = [...document.querySelectorAll('.jp-OutputArea-output')]
                        .some(e => /Traceback|\\w+Error: /.test(e.textContent));
                    // JupyterLab's windowing may leave an off-screen prompt unrefreshed: the run is over when no
                    // prompt shows "[*]", the last code cell has its number and the kernel is idle.
                    const idle = /Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent || '');
                    const last = prompts[prompts.length - 1];
                    return failed || (prompts.length > 0 && idle && !prompts.some(p => /\\[\\*\\]/.test(p.textContent))
                                      && /\\[\\d+\\]/.test(last.textContent));
                }""", timeout=RUN_TIMEOUT_S * 1000, polling=1000)
        except Exception:
            page.screenshot(path=str(shots / f"{name[:-6]}_timed_out.png"), full_page=True)
            raise
        elapsed = time.monotonic() - started
        page.screenshot(path=str(shots / f"{name[:-6]}_ran.png"), full_page=True)

        tracebacks = page.eval_on_selector_all(
            ".jp-OutputArea-output", "els => els.map(e => e.textContent).filter(t => /Traceback|\\w+Error: /.test(t))")
        assert not tracebacks, f"{name}: error outputs in the page: {[t[:300] for t in tracebacks]}"

        # Figures: every img rendered with a size, one per PNG output the kernel sent.
        # Each is scrolled into view first: JupyterLab may hide the cells outside the viewport (windowing).
        images = page.eval_on_selector_all(
            ".jp-OutputArea-output img",
            """async els => {
                const sizes = [];
                for (const e of els) {
                    e.scrollIntoView({block: "center"});
                    await new Promise(done => setTimeout(done, 200));
                    const box = e.getBoundingClientRect();
                    sizes.push([e.naturalWidth, box.width, box.height]);
                }
                return sizes;
            }""")
        # Every img loaded (no broken image); the ones laid out on the page are the figures. JupyterLab can keep
        # the outputs a cell had before Run All in hidden nodes (zero size): they are not counted.
        assert images and all(w > 0 for w, _, _ in images), f"{name}: an image did not load: {images}"
        shown = [img for img in images if img[1] > 0 and img[2] > 0]

        # Widgets: the sliders are drawn, none failed, and moving one redraws the figure below it.
        assert page.locator(".jp-OutputArea-output >> text=Error displaying widget").count() == 0
        sliders = page.locator(".jupyter-widgets.widget-slider")
        assert sliders.count() >= 2, f"{name}: the live controls did not render"
        # The first *visible* cell with sliders: JupyterLab can keep a hidden copy of a cell's old output nodes.
        cell = page.locator(".jp-CodeCell:visible", has=page.locator(".jupyter-widgets.widget-slider:visible")).first
        cell.scroll_into_view_if_needed()
        before = cell.locator(".jp-OutputArea-output img").first.get_attribute("src")
        handle = cell.locator(".noUi-handle, .slider-container input, .ui-slider-handle").first
        handle.focus()
        page.keyboard.press("End")
        page.wait_for_function(
            """([cellIndex, before]) => {
                const visible = e => e && e.getClientRects().length > 0;
                const cell = [...document.querySelectorAll('.jp-CodeCell')]
                    .filter(c => visible(c) && visible(c.querySelector('.jupyter-widgets.widget-slider')))[cellIndex];
                const img = cell && cell.querySelector('.jp-OutputArea-output img');
                return img && img.src !== before && img.naturalWidth > 0;
            }""", arg=[0, before], timeout=120_000, polling=500)
        cell.screenshot(path=str(shots / f"{name[:-6]}_slider_moved.png"))

        # Save through the UI and read what the kernel produced: no error outputs, as many figures as imgs.
        page.keyboard.press("Control+s")
        page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=60_000)
        saved = root / name
        assert not _errors(saved), f"{name}: {_errors(saved)}"
        assert len(shown) >= _png_outputs(saved) > 0, f"{name}: {len(shown)} figures shown for {_png_outputs(saved)} PNGs"
        print(f"{name}: all cells ran in {elapsed:.0f} s through the UI; {len(shown)} figures, "
              f"{sliders.count()} sliders; screenshots in {shots}")
    finally:
        page.close()
