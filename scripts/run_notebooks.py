#!/usr/bin/env python
"""Execute the course notebooks with papermill.

    python scripts/run_notebooks.py                      # every CPU course notebook, full size, into runs/
    python scripts/run_notebooks.py 01 02 --smoke        # pick notebooks by number, name or glob; small sizes
    python scripts/run_notebooks.py 02 -p ALPHA 0.1      # papermill parameters, passed to every notebook
    python scripts/run_notebooks.py --store 01           # re-execute in full size and store the outputs in place

The course notebooks are ``notebooks/[0-9]*.ipynb``. A notebook whose metadata has
``metadata["nca_kit"]["requires_gpu"] = true`` is skipped on a machine without CUDA, and so is a notebook with a
``SCALE`` parameter run with ``-p SCALE paper`` (notebooks 30-32 at the paper's 7B scale).

Each executed copy is written to ``<out>/<name>.ipynb``; the notebooks save their figures into the folder named by
the environment variable ``NCA_KIT_OUT``, which is set to ``<out>`` (default ``runs/``). ``--smoke`` sets
``NCA_KIT_SMOKE=1``, the switch every course notebook reads in its third cell. The exit status is non-zero if any
notebook fails.

``--store`` is how the committed notebooks get their outputs: each is executed top to bottom in full size with
nbclient (no parameters, no timing metadata) and written back in place, so that the stored outputs are the
reference nbval compares against (see ``tests/test_notebooks.py``).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
COURSE_GLOB = "[0-9]*.ipynb"


# --------------------------------------------------------------------------------------------------------------------
# Notebook metadata: metadata["nca_kit"] = {"requires_gpu": bool, "nbval": "strict" | "lax"}
# --------------------------------------------------------------------------------------------------------------------


def nca_kit_metadata(path: Path) -> dict:
    """The notebook's ``metadata["nca_kit"]`` dict (empty if absent)."""
    import nbformat

    return dict(nbformat.read(str(path), as_version=4).metadata.get("nca_kit", {}))


def requires_gpu(path: Path, parameters: dict | None = None) -> bool:
    """Metadata ``requires_gpu``, or ``-p SCALE paper`` for a notebook with a ``SCALE`` parameter (30-32: the
    paper-scale run is a 7B model)."""
    if nca_kit_metadata(path).get("requires_gpu", False):
        return True
    return (parameters or {}).get("SCALE") == "paper" and "SCALE" in notebook_parameters(path)


def notebook_parameters(path: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters`` cell."""
    import nbformat

    for cell in nbformat.read(str(path), as_version=4).cells:
        if "parameters" in cell.metadata.get("tags", []):
            return {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
    return set()


def nbval_mode(path: Path) -> str:
    """``"strict"`` (nbval compares every cell's stored output) or ``"lax"`` (only cells tagged to be checked).

    Notebooks that do not say are ``"lax"``: their in-notebook asserts are the test.
    """
    mode = nca_kit_metadata(path).get("nbval", "lax")
    if mode not in ("strict", "lax"):
        raise ValueError(f"{path.name}: metadata nca_kit.nbval must be 'strict' or 'lax', got {mode!r}")
    return mode


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------------------------------------------------
# Selection and parameters
# --------------------------------------------------------------------------------------------------------------------


def course_notebooks(directory: Path = NOTEBOOKS) -> list[Path]:
    """All course notebooks of ``directory``, in course order."""
    return sorted(directory.glob(COURSE_GLOB))


def resolve(patterns: list[str], directory: Path = NOTEBOOKS) -> list[Path]:
    """Notebooks named by ``patterns``: a path, a number (``01``), a name with or without ``.ipynb``, or a glob.

    No pattern means every course notebook. Raises ``SystemExit`` for a pattern that matches nothing.
    """
    available = course_notebooks(directory)
    if not patterns:
        return available
    chosen: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.suffix == ".ipynb" and path.is_file():
            matches = [path.resolve()]
        else:
            stem = pattern[:-len(".ipynb")] if pattern.endswith(".ipynb") else pattern
            matches = [nb for nb in available
                       if nb.stem == stem or nb.stem.split("_")[0] == stem
                       or fnmatch.fnmatch(nb.name, pattern) or fnmatch.fnmatch(nb.stem, pattern)]
        if not matches:
            names = ", ".join(nb.stem for nb in available) or "none"
            raise SystemExit(f"no notebook matches {pattern!r} (course notebooks: {names})")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def parse_value(text: str):
    """A ``-p`` value as papermill's command line reads it: a Python literal if it is one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# --------------------------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------------------------


def _kernel_env(out: Path, smoke: bool | None) -> None:
    """Environment the kernels inherit: figures into ``out``; the smoke switch; matplotlib left to the kernel."""
    os.environ["NCA_KIT_OUT"] = str(out.resolve())
    if smoke is True:
        os.environ["NCA_KIT_SMOKE"] = "1"
    elif smoke is False:
        os.environ.pop("NCA_KIT_SMOKE", None)
    # A backend forced for scripts (e.g. MPLBACKEND=Agg in CI) would stop figures from showing in the notebooks.
    os.environ.pop("MPLBACKEND", None)


def run(path: Path, out: Path, parameters: dict, kernel: str | None, timeout: int) -> Path:
    """Execute ``path`` with papermill into ``out/<name>.ipynb`` (cwd: the notebook's folder)."""
    import papermill

    target = out / path.name
    papermill.execute_notebook(
        str(path), str(target), parameters=parameters, kernel_name=kernel, cwd=str(path.parent),
        progress_bar=False, log_output=False, execution_timeout=timeout,
    )
    return target


def store(path: Path, kernel: str | None, timeout: int) -> None:
    """Execute ``path`` top to bottom in full size and write it back with its outputs and nothing machine-specific."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("papermill", None)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel or nb.metadata.kernelspec.name,
                            resources={"metadata": {"path": str(path.parent)}}, record_timing=False)
    client.execute()
    nb.metadata.get("widgets", {}).clear()
    nbformat.write(nb, str(path))


def _describe(error: Exception) -> str:
    name = getattr(error, "ename", type(error).__name__)
    value = getattr(error, "evalue", str(error))
    cell = getattr(error, "exec_count", None)
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"{name}{where}: {str(value).strip().splitlines()[0] if str(value).strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("notebooks", nargs="*", help="numbers (01), names, globs or paths; default: all")
    parser.add_argument("-o", "--out", "--output-dir", dest="out", default=str(REPO / "runs"),
                        help="folder for executed notebooks and figures (default: runs/)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="papermill parameter for every notebook (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="small sizes: sets NCA_KIT_SMOKE=1")
    parser.add_argument("--store", action="store_true",
                        help="execute in full size and store outputs in the notebooks themselves")
    parser.add_argument("--list", action="store_true", help="print the selection and exit")
    parser.add_argument("--notebooks-dir", default=str(NOTEBOOKS), help="where course notebooks live")
    parser.add_argument("--kernel", default=None, help="kernel name (default: the notebook's own, python3)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    if args.store and (args.parameter or args.smoke):
        parser.error("--store keeps the defaults of the parameters cell: drop -p and --smoke")
    selected = resolve(args.notebooks, Path(args.notebooks_dir))
    parameters = {name: parse_value(value) for name, value in args.parameter}
    gpu_only = [nb for nb in selected if requires_gpu(nb, parameters)]
    skipped = gpu_only if gpu_only and not cuda_available() else []
    todo = [nb for nb in selected if nb not in skipped]
    for nb in skipped:
        why = "SCALE paper" if not requires_gpu(nb) else "metadata nca_kit.requires_gpu"
        print(f"skip  {nb.stem}: requires a GPU ({why}) and CUDA is not available")
    if args.list:
        for nb in todo:
            print(f"run   {nb.stem}")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _kernel_env(out, smoke=True if args.smoke else (False if args.store else None))
    started = time.time()
    failed, written = [], []
    for nb in todo:
        t0 = time.time()
        try:
            if args.store:
                store(nb, args.kernel, args.timeout)
                written.append(nb)
            else:
                written.append(run(nb, out, parameters, args.kernel, args.timeout))
        except Exception as error:  # report every notebook, fail at the end
            failed.append(nb)
            print(f"FAIL  {nb.stem} ({time.time() - t0:.1f} s): {_describe(error)}")
            if not args.store and (out / nb.name).exists():
                print(f"      executed copy with the error: {out / nb.name}")
            continue
        print(f"ok    {nb.stem} ({time.time() - t0:.1f} s)")

    figures = sorted(p for p in out.glob("*.png") if p.stat().st_mtime >= started - 1)
    print(f"{len(todo) - len(failed)}/{len(todo)} notebooks ran in {time.time() - started:.1f} s")
    if written:
        print(("stored in place: " if args.store else "executed notebooks: ") + ", ".join(map(str, written)))
    if figures:
        print(f"figures ({len(figures)}) in {out}/: " + ", ".join(p.name for p in figures))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
