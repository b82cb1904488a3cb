"""Notebook tests: every notebook under ``notebooks/`` runs under nbval, with the smoke switch on (``make test``) or in
full size (``make test NOTEBOOKS=full``: the notebooks ``make demo`` runs, in the size it runs them; what CI runs).

How stored outputs are compared
-------------------------------
The committed notebooks hold the outputs of one full-size run, top to bottom (``python scripts/run_notebooks.py
--store``). The tests execute the *same* cells in smoke mode (``NCA_KIT_SMOKE=1``), and each notebook's metadata says
how strictly nbval compares:

* ``metadata["nca_kit"]["nbval"] = "strict"``: ``pytest --nbval``. Every cell's output must equal the stored one,
  after ``tests/nbval_sanitize.cfg``. A cell whose printed numbers depend on the smoke sizes (Monte Carlo draws, for
  instance) carries nbval's cell tag ``nbval-ignore-output``: it still runs and its asserts must hold, only its text
  is not compared. Everything else in a strict notebook prints the same in both modes.
* ``"lax"`` (also the default when the key is absent): ``pytest --nbval-lax``. Only cells tagged
  ``nbval-check-output`` are compared; the notebook's own asserts are the test.

A notebook with ``metadata["nca_kit"]["requires_gpu"] = true`` is skipped on a machine without CUDA.

nbval's strict/lax switch is global to a pytest process, so each notebook runs in its own, the equivalent of::

    NCA_KIT_SMOKE=1 python -m pytest --nbval --nbval-current-env \\
        --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider notebooks/01_dpo_to_infonca.ipynb

(``--nbval-lax`` instead of ``--nbval`` for a lax notebook). The runner script is tested here too, on small
notebooks written by the tests.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import notebook_mode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]
SANITIZE = REPO / "tests" / "nbval_sanitize.cfg"
RUNNER = REPO / "scripts" / "run_notebooks.py"


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def nbval_command(path: Path) -> list[str]:
    """The pytest command line that validates notebook ``path`` (strict or lax from its metadata)."""
    flag = "--nbval" if runner.nbval_mode(path) == "strict" else "--nbval-lax"
    return [sys.executable, "-m", "pytest", flag, "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
            "-p", "no:cacheprovider", "-q", str(path)]


@pytest.mark.notebook
def test_notebook_passes_nbval(notebook_path, notebook_env, tmp_path):
    if runner.requires_gpu(notebook_path) and not runner.cuda_available():
        pytest.skip("notebook requires a GPU (metadata nca_kit.requires_gpu) and CUDA is not available")
    full = notebook_mode() == "full"
    result = subprocess.run(nbval_command(notebook_path), cwd=REPO, env=notebook_env, capture_output=True,
                            text=True, timeout=3600 if full else 900)
    report = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"nbval failed on {notebook_path.name}:\n{report}"
    figures = list((tmp_path / "out").glob("*.png"))
    assert figures, f"{notebook_path.name} saved no figure into NCA_KIT_OUT"


# --------------------------------------------------------------------------------------------------------------------
# scripts/run_notebooks.py
# --------------------------------------------------------------------------------------------------------------------


def _notebook(path: Path, *code: str, gpu: bool = False, nbval: str = "lax") -> Path:
    nb = new_notebook(cells=[new_markdown_cell("# test notebook"), *map(new_code_cell, code)])
    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["nca_kit"] = {"requires_gpu": gpu, "nbval": nbval}
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def course_dir(tmp_path) -> Path:
    """A folder of course notebooks: a CPU one, a GPU-only one, a failing one, and one that is not in the course."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_ok.ipynb",
              "SMOKE = False\nX = 1",
              "import os, pathlib\n"
              "SMOKE = SMOKE or os.environ.get('NCA_KIT_SMOKE') == '1'\n"
              "OUT = pathlib.Path(os.environ['NCA_KIT_OUT'])",
              "assert SMOKE\n(OUT / '01_ok.png').write_bytes(b'png')\nprint(f'X = {X}')")
    _notebook(folder / "02_gpu.ipynb", "SMOKE = False", "import torch\nassert torch.cuda.is_available()", gpu=True)
    _notebook(folder / "03_fails.ipynb", "SMOKE = False\nX = 0", "raise RuntimeError('this notebook fails on purpose')")
    _notebook(folder / "scratch.ipynb", "SMOKE = False")
    return folder


def test_runner_selects_course_notebooks(course_dir, capsys):
    assert runner.main(["--notebooks-dir", str(course_dir), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "run   01_ok" in lines and "run   03_fails" in lines
    assert not any("scratch" in line for line in lines), "only numbered notebooks belong to the course"
    gpu_line = "run   02_gpu" if runner.cuda_available() else next(line for line in lines if "02_gpu" in line)
    assert gpu_line in lines
    if not runner.cuda_available():
        assert gpu_line.startswith("skip") and "requires a GPU" in gpu_line


@pytest.mark.parametrize("pattern, expected", [
    ("01", ["01_ok"]), ("01_ok", ["01_ok"]), ("01_ok.ipynb", ["01_ok"]), ("0[13]*", ["01_ok", "03_fails"]),
])
def test_runner_resolves_names_numbers_and_globs(course_dir, pattern, expected):
    assert [p.stem for p in runner.resolve([pattern], course_dir)] == expected


def test_runner_resolves_paths_and_rejects_unknown_names(course_dir):
    assert runner.resolve([str(course_dir / "scratch.ipynb")], course_dir) == [(course_dir / "scratch.ipynb")]
    with pytest.raises(SystemExit, match="no notebook matches"):
        runner.resolve(["99"], course_dir)


@pytest.mark.parametrize("text, value", [("0.1", 0.1), ("7", 7), ("True", True), ("None", None), ("[1, 2]", [1, 2]),
                                         ("runs/x", "runs/x"), ("hello", "hello")])
def test_runner_parses_parameter_values_like_papermill(text, value):
    assert runner.parse_value(text) == value


def test_nbval_mode_comes_from_metadata(tmp_path):
    strict = _notebook(tmp_path / "a.ipynb", "SMOKE = False", nbval="strict")
    lax = _notebook(tmp_path / "b.ipynb", "SMOKE = False", nbval="lax")
    assert "--nbval" in nbval_command(strict) and "--nbval-lax" in nbval_command(lax)
    nb = nbformat.read(str(lax), as_version=4)
    del nb.metadata["nca_kit"]
    nbformat.write(nb, str(lax))
    assert runner.nbval_mode(lax) == "lax"
    bad = _notebook(tmp_path / "c.ipynb", "SMOKE = False", nbval="sometimes")
    with pytest.raises(ValueError, match="strict' or 'lax"):
        runner.nbval_mode(bad)


@pytest.mark.notebook
def test_runner_executes_passes_parameters_and_reports_failure(course_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NCA_KIT_SMOKE", raising=False)
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, str(RUNNER), "01", "03", "--notebooks-dir", str(course_dir), "--out", str(out), "--smoke",
         "-p", "X", "7"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, "a failing notebook must fail the run"
    assert "ok    01_ok" in result.stdout and "FAIL  03_fails" in result.stdout
    assert "RuntimeError" in result.stdout and str(out) in result.stdout
    executed = nbformat.read(str(out / "01_ok.ipynb"), as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "X = 7" in injected[0].source
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "X = 7" in printed
    assert (out / "01_ok.png").exists() and "01_ok.png" in result.stdout
    assert (out / "03_fails.ipynb").exists(), "the executed copy with the error is kept for inspection"
    assert "[1/2] 01_ok started" in result.stdout and "[2/2] 03_fails started" in result.stdout
    summary = result.stdout.split("1/2 notebooks ran")[1]
    assert "01_ok" in summary and "01_ok.png" in summary and "FAIL" in summary, "a summary: time, result, figures"
    log = result.stdout + result.stderr
    assert "IPKernelApp" not in log and "KeyboardInterrupt" not in log, "kernel log lines go to the log file"
    assert (out / "logs" / "01_ok.kernel.log").exists()


def test_runner_refuses_a_parameter_a_notebook_does_not_declare(course_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--notebooks-dir", str(course_dir), "--list", "01", "-p", "APLHA", "0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "APLHA is not a parameter of 01_ok (declared: SMOKE, X)" in err
    assert runner.main(["--notebooks-dir", str(course_dir), "--list", "01", "-p", "X", "2"]) == 0


def test_runner_keeps_smoke_and_full_runs_apart():
    assert runner.default_out(True) == REPO / "runs" / "smoke" and runner.default_out(False) == REPO / "runs" / "full"


def test_runner_skips_paper_scale_without_cuda(course_dir, capsys):
    _notebook(course_dir / "04_scaled.ipynb", "SMOKE = False\nSCALE = 'tiny'")
    assert runner.main(["--notebooks-dir", str(course_dir), "--list", "-p", "SCALE", "paper"]) == 0
    lines = capsys.readouterr().out.splitlines()
    if runner.cuda_available():
        assert "run   04_scaled" in lines
    else:
        assert "skip  04_scaled: requires a GPU (SCALE paper) and CUDA is not available" in lines
    assert "run   01_ok" in lines, "a notebook without a SCALE parameter runs"
    assert runner.main(["--notebooks-dir", str(course_dir), "--list", "-p", "SCALE", "tiny"]) == 0
    assert "run   04_scaled" in capsys.readouterr().out.splitlines()


def test_runner_refuses_to_store_with_parameters(course_dir):
    with pytest.raises(SystemExit):
        runner.main(["--notebooks-dir", str(course_dir), "--store", "--smoke", "01"])
