#!/usr/bin/env python
"""Execute the course notebooks with papermill.

    python scripts/run_notebooks.py                      # every CPU course notebook, full size, into runs/full/
    python scripts/run_notebooks.py 01 02 --smoke        # pick notebooks by number, name or glob; small sizes, runs/smoke/
    python scripts/run_notebooks.py 02 -p ALPHA 0.1      # papermill parameters, passed to every notebook
    python scripts/run_notebooks.py --store 01           # re-execute in full size and store the outputs in place

The course notebooks are ``notebooks/[0-9]*.ipynb``. A notebook whose metadata has
``metadata["nca_kit"]["requires_gpu"] = true`` is skipped on a machine without CUDA, and so is a notebook with a
``SCALE`` parameter run with ``-p SCALE paper`` (notebooks 30-32 at the paper's 7B scale).

Each executed copy is written to ``<out>/<name>.ipynb``; the notebooks save their figures into the folder named by
the environment variable ``NCA_KIT_OUT``, which is set to ``<out>``. The default ``<out>`` is ``runs/full/``, or
``runs/smoke/`` with ``--smoke`` (``make lab`` uses ``runs/lab/``), so the three never share a run folder.
``--smoke`` sets ``NCA_KIT_SMOKE=1``, the switch every course notebook reads in its third cell. A ``-p NAME`` that no
selected notebook declares in its parameters cell is refused before anything runs; one that some declare is passed
to those only. Each notebook prints one
progress line when it starts (its place in the selection, the elapsed time, an estimate of the time left from the
last run's timings in ``<out>/timings.json``) and one when it ends; a summary at the end gives the time per notebook
and the figures each wrote, with the kernel's CPU time (user + system; on a busy machine the wall time says more
about the other jobs than about the notebook). The kernels' own log lines (transport warnings, the shutdown
interrupt) go to ``<out>/logs/<name>.kernel.log``, not the terminal. The exit status is non-zero if any notebook fails.

``--store`` is how the committed notebooks get their outputs: each is executed top to bottom in full size with
nbclient (no parameters, no timing metadata) and written back in place, so that the stored outputs are the
reference nbval compares against (see ``tests/test_notebooks.py``).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
COURSE_GLOB = "[0-9]*.ipynb"
RUNS = REPO / "runs"  # runs/full (default), runs/smoke (--smoke), runs/lab (make lab)


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


def default_out(smoke: bool) -> Path:
    """``runs/smoke`` or ``runs/full``: smoke and full runs never share a folder (results, run records, figures)."""
    return RUNS / ("smoke" if smoke else "full")


def undeclared_parameters(notebooks: list[Path], names) -> list[str]:
    """Names of ``names`` that no notebook of ``notebooks`` declares, each with the names they do declare (a
    misspelt ``-p APLHA 0.5`` would otherwise run the defaults). A name some of them declare goes to those only."""
    declared = set().union(*(notebook_parameters(nb) for nb in notebooks)) if notebooks else set()
    which = ", ".join(nb.stem for nb in notebooks)
    return [f"{name} is not a parameter of {which} (declared: {', '.join(sorted(declared)) or 'none'})"
            for name in names if name not in declared]


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
    if smoke is False:  # --store: outputs kept in the repository hold no timings (nca_kit.progress lines)
        os.environ["NCA_KIT_PROGRESS"] = "0"
    # A backend forced for scripts (e.g. MPLBACKEND=Agg in CI) would stop figures from showing in the notebooks.
    os.environ.pop("MPLBACKEND", None)


def _quiet_kernel_manager(log: Path):
    """A kernel manager whose kernel writes its own log lines (stderr: "running over TCP without encryption", the
    "KeyboardInterrupt caught in kernel" of a shutdown) to ``log`` instead of the terminal."""
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as stderr:  # the child keeps its own descriptor
                kw.setdefault("stderr", stderr)
                await super()._async_launch_kernel(kernel_cmd, **kw)

    return QuietKernelManager


def run(path: Path, out: Path, parameters: dict, kernel: str | None, timeout: int) -> Path:
    """Execute ``path`` with papermill into ``out/<name>.ipynb`` (cwd: the notebook's folder)."""
    import papermill

    target = out / path.name
    log = out / "logs" / f"{path.stem}.kernel.log"
    log.unlink(missing_ok=True)
    papermill.execute_notebook(
        str(path), str(target), parameters=parameters, kernel_name=kernel, cwd=str(path.parent),
        progress_bar=False, log_output=False, execution_timeout=timeout,
        kernel_manager_class=_quiet_kernel_manager(log),
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
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nca-kit-store-") as logs:  # the kernel's own log lines: not shown
        client = NotebookClient(nb, timeout=timeout, kernel_name=kernel or nb.metadata.kernelspec.name,
                                resources={"metadata": {"path": str(path.parent)}}, record_timing=False,
                                kernel_manager_class=_quiet_kernel_manager(Path(logs) / "kernel.log"))
        client.execute()
    nb.metadata.get("widgets", {}).clear()
    nbformat.write(nb, str(path))


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: the notebook kernels."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    parser.add_argument("-o", "--out", "--output-dir", dest="out", default=None,
                        help="folder for executed notebooks and figures (default: runs/full, or runs/smoke)")
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
    problems = undeclared_parameters(selected, parameters)
    if problems:
        parser.error("; ".join(problems))
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

    out = Path(args.out) if args.out else default_out(args.smoke)
    out.mkdir(parents=True, exist_ok=True)
    _kernel_env(out, smoke=True if args.smoke else (False if args.store else None))
    timings_file = out / "timings.json"
    try:
        previous = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    except ValueError:
        previous = {}
    started = time.time()
    failed, written, rows = [], [], []
    for i, nb in enumerate(todo, start=1):
        t0, cpu0 = time.time(), _children_cpu()
        left = [previous.get(n.stem) for n in todo[i - 1:]]
        eta = f", about {sum(left) / 60:.0f} min left by the last run's times" if all(left) else ""
        print(f"[{i}/{len(todo)}] {nb.stem} started at {t0 - started:.0f} s{eta}", flush=True)
        try:
            if args.store:
                store(nb, args.kernel, args.timeout)
                written.append(nb)
            else:
                declared = notebook_parameters(nb)
                own = {name: value for name, value in parameters.items() if name in declared}
                written.append(run(nb, out, own, args.kernel, args.timeout))
        except Exception as error:  # report every notebook, fail at the end
            failed.append(nb)
            print(f"FAIL  {nb.stem} ({time.time() - t0:.1f} s): {_describe(error)}", flush=True)
            if not args.store and (out / nb.name).exists():
                print(f"      executed copy with the error: {out / nb.name}")
            rows.append((nb.stem, time.time() - t0, _children_cpu() - cpu0, "FAIL", []))
            continue
        seconds, cpu = time.time() - t0, _children_cpu() - cpu0
        figures = sorted(p.name for p in out.glob("*.png") if p.stat().st_mtime >= t0 - 1)
        rows.append((nb.stem, seconds, cpu, "ok", figures))
        print(f"ok    {nb.stem} ({seconds:.1f} s, kernel CPU {cpu:.0f} s)", flush=True)
        if not parameters and not args.store:
            previous[nb.stem] = round(seconds, 1)
            timings_file.write_text(json.dumps(previous, indent=1, sort_keys=True) + "\n")

    total = time.time() - started
    load = ", load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"\n{len(todo) - len(failed)}/{len(todo)} notebooks ran in {total:.1f} s ({total / 60:.1f} min; "
          f"{os.cpu_count()} CPUs{load})")
    if rows:
        width = max(len(r[0]) for r in rows)
        print(f"{'notebook':{width}s}  {'wall':>8s}  {'kernel CPU':>10s}  result  figures")
        for name, seconds, cpu, result, figures in rows:
            print(f"{name:{width}s}  {seconds:7.1f}s  {cpu:9.0f}s  {result:6s}  {', '.join(figures) or '-'}")
    if written:
        print(("stored in place: " if args.store else "executed notebooks in: ")
              + (", ".join(map(str, written)) if args.store else f"{out}/"))
    figures = sorted(p for p in out.glob("*.png") if p.stat().st_mtime >= started - 1)
    if figures:
        print(f"figures ({len(figures)}) in {out}/: " + ", ".join(p.name for p in figures))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
