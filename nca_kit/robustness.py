r"""The α × β robustness grid of the paper's Fig. 6/8: one :mod:`nca_kit.experiment` run per (method, α, β, seed).

The paper trains InfoNCA and NCA at every α (reward temperature: soft labels ``softmax(r / α)``) and β (implicit
reward scale: ``r_θ = β log π/μ``) of a grid and DPO at every β (DPO has no α), and reads how much the evaluation
score moves across the grid: NCA's moves less ("NCA is more robust to α and β"). Here a run is the kit's usual
arithmetic run (:class:`nca_kit.experiment.ExperimentSpec`) at the grid's α and β, so the grid is a list of specs:

    cells = plan([0.01, 0.1, 1], [0.01, 0.1, 1], seeds=[0, 1])            # (method, α, β, seed), seed by seed
    specs = grid_specs(cells, ExperimentSpec(steps=8, n_eval=40))
    records = run_grid(specs, "runs/alpha_beta")                          # resumes: finished cells are read back
    table = grid_table(records, "sample_reward")                          # method -> β x α array of seed means

Run folders: ``<out>/alpha<α>_beta<β>/tiny_runs/<method>_k<K>_s<seed>/`` (``results.json`` is the record of
:mod:`nca_kit.experiment`); DPO's go to ``<out>/beta<β>/`` since α does not enter its loss. A cell whose
``results.json`` exists is not run again, so an interrupted grid resumes where it stopped.

How robust a method is: :func:`robustness_summary` gives, per method, the mean, min, max and range (max − min) of
the seed-mean score over its cells, next to the seed noise (mean |seed a − seed b| of a cell), the yardstick a
range has to exceed before it says anything.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from nca_kit.experiment import METHODS, ExperimentSpec, run_experiment

__all__ = ["ALPHA_FREE_METHODS", "uses_alpha", "plan", "grid_specs", "cell_dir", "run_grid", "load_grid_records",
           "grid_table", "seed_noise", "robustness_summary", "summary_markdown", "grid_markdown", "plot_grid"]

#: The held-out metrics the α × β grid reports, with their axis labels.
METRIC_LABELS = {"sample_reward": "sample reward (0-10)", "greedy_accuracy": "greedy accuracy",
                 "kl": "KL to the reference"}


def uses_alpha(method: str) -> bool:
    """Whether ``method``'s loss reads α (InfoNCA, NCA on K rewards; :data:`nca_kit.losses.LOSSES`); the others
    are swept over β only."""
    return METHODS[method].uses_alpha


#: Methods whose loss does not read α (the DPO family and pairwise NCA: the pairwise losses are the α -> 0 limit).
ALPHA_FREE_METHODS = tuple(m for m in METHODS if not uses_alpha(m))


def plan(alphas, betas, seeds, *, methods=("infonca", "nca"), beta_methods=("dpo",)) -> list[tuple]:
    """``(method, α, β, seed)`` in execution order: every cell of seed 0 (β by β), then seed 1, ... .

    ``methods`` are swept over ``alphas x betas``; ``beta_methods`` (whose loss has no α) over ``betas`` only,
    with α = ``None``. An interrupted grid thus has whole seeds finished, not a corner of every seed.
    """
    for name, values in (("alphas", alphas), ("betas", betas), ("seeds", seeds)):
        if not values:
            raise ValueError(f"{name} must hold at least one value, got {list(values)!r}")
    for method in methods:
        if method not in METHODS or not uses_alpha(method):
            raise ValueError(f"methods must be reward methods whose loss reads alpha (infonca, nca), got {method!r}")
    for method in beta_methods:
        if method not in METHODS or uses_alpha(method):
            raise ValueError(f"beta_methods must be methods without alpha (dpo, pair_nca, ...), got {method!r}")
    cells = []
    for seed in seeds:
        for beta in betas:
            cells += [(m, a, beta, seed) for a, m in itertools.product(alphas, methods)]
            cells += [(m, None, beta, seed) for m in beta_methods]
    return cells


def grid_specs(cells, base: ExperimentSpec) -> list[ExperimentSpec]:
    """One validated spec per cell: ``base`` with the cell's method, α, β and seed (α-free methods keep ``base``'s
    α, which their loss ignores)."""
    return [replace(base, method=m, alpha=base.alpha if a is None else float(a), beta=float(b), seed=int(s))
            for m, a, b, s in cells]


def cell_dir(out: str | Path, spec: ExperimentSpec) -> Path:
    """``<out>/alpha<α>_beta<β>`` (``<out>/beta<β>`` for a method without α): the ``out`` of the cell's run."""
    name = f"alpha{spec.alpha:g}_beta{spec.beta:g}" if uses_alpha(spec.method) else f"beta{spec.beta:g}"
    return Path(out) / name


def results_path(out: str | Path, spec: ExperimentSpec) -> Path:
    return cell_dir(out, spec) / "tiny_runs" / spec.run_name / "results.json"


def run_grid(specs, out: str | Path, *, progress: bool = True, workers: int = 1) -> list[dict]:
    """Run every spec whose ``results.json`` is missing (a progress line per run) and return all records, in the
    order of ``specs``.

    Finished cells are read back, not rerun: an interrupted grid resumes, and a grid run by
    ``scripts/run_grid.py --alphas ... --betas ...`` is collected by calling this with the same specs. A finished
    cell run with other settings is an error (pass another ``out``).

    ``workers > 1`` trains that many cells at once in separate processes (joblib; each process limited to its share
    of the cores): worth it for the tiny model, whose runs are too small to keep two cores busy; a SmolLM2 cell
    already uses every core. A run's printed lines are dropped (its record and ``metrics.jsonl`` hold everything).
    A process gets fewer torch threads than a run alone would, so float sums round differently and a record can
    differ from a one-process run in its last digits, and through the sampled evaluation answers by about the seed
    noise: compare runs made with the same ``workers``.
    """
    from nca_kit.progress import progress as progress_lines

    specs = list(specs)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    records: list[dict | None] = [None] * len(specs)
    todo = []
    for i, spec in enumerate(specs):
        path = results_path(out, spec)
        if path.exists():
            record = json.loads(path.read_text())
            wanted = spec.to_dict()
            changed = sorted(k for k, v in record["spec"].items() if k in wanted and wanted[k] != v)
            if changed:
                raise ValueError(f"out: {path} was run with other settings ({', '.join(changed)}); pass another "
                                 "out folder or the same settings")
            records[i] = record
        else:
            todo.append(i)
    if int(workers) == 1 or len(todo) < 2:
        results = (_run_cell(specs[i], out) for i in todo)
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=min(int(workers), len(todo)), return_as="generator")(
            delayed(_run_cell_in_worker)(specs[i], out) for i in todo)
    for i, record in zip(todo, progress_lines(results, total=len(todo), desc="alpha x beta grid", unit="run",
                                              bar=progress)):
        records[i] = record
    return records


def _run_cell(spec: ExperimentSpec, out: str | Path) -> dict:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return run_experiment(spec, out=cell_dir(out, spec))


def _run_cell_in_worker(spec: ExperimentSpec, out: str | Path) -> dict:
    """:func:`_run_cell` in a worker process: its progress bars would go to the parent's terminal, not to a cell."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    # peft reads transformers' renamed `is_gradient_checkpointing` attribute (as in nca_kit.train's CLI)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file")  # peft, saving an adapter of a GGUF model
    return _run_cell(spec, out)


def load_grid_records(out: str | Path) -> list[dict]:
    """Every finished record under ``<out>/*/tiny_runs/``, sorted by path."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/tiny_runs/*/results.json"))]


def _metric(record: dict, metric: str) -> float:
    return float(record["trained"][metric])


def grid_table(records, metric: str) -> dict:
    """``{method: {"alphas", "betas", "mean", "seeds"}}``: ``mean[i, j]`` is the seed mean of ``metric`` (a key of
    the trained model's evaluation, e.g. ``"sample_reward"``) at ``betas[i]``, ``alphas[j]``; NaN where no run
    finished; ``seeds[i, j]`` the number of seeds averaged. α-free methods have one column, ``alphas == [None]``."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == method]
        alphas = sorted({r["alpha"] for r in runs}) if uses_alpha(method) else [None]
        betas = sorted({r["beta"] for r in runs})
        mean = np.full((len(betas), len(alphas)), np.nan)
        count = np.zeros((len(betas), len(alphas)), int)
        for i, beta in enumerate(betas):
            for j, alpha in enumerate(alphas):
                values = [_metric(r, metric) for r in runs
                          if r["beta"] == beta and (alpha is None or r["alpha"] == alpha)]
                if values:
                    mean[i, j], count[i, j] = float(np.mean(values)), len(values)
        out[method] = {"alphas": alphas, "betas": betas, "mean": mean, "seeds": count}
    return out


def seed_noise(records, metric: str) -> float:
    """Mean absolute difference of ``metric`` between two seeds of the same (method, α, β) cell: how much a cell
    moves by chance alone. NaN when no cell has two seeds."""
    by_cell: dict[tuple, list[float]] = {}
    for r in records:
        key = (r["method"], r["alpha"] if uses_alpha(r["method"]) else None, r["beta"])
        by_cell.setdefault(key, []).append(_metric(r, metric))
    gaps = [abs(a - b) for values in by_cell.values() for a, b in itertools.combinations(values, 2)]
    return float(np.mean(gaps)) if gaps else float("nan")


def robustness_summary(records, metric: str) -> dict:
    """Per method: ``mean``, ``min``, ``max``, ``range`` (max − min) and ``std`` of the seed-mean ``metric`` over
    its finished cells, and ``cells``; plus ``"seed_noise"`` (:func:`seed_noise`), the yardstick for the ranges."""
    summary = {}
    for method, table in grid_table(records, metric).items():
        values = table["mean"][np.isfinite(table["mean"])]
        summary[method] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
                           "range": float(values.max() - values.min()), "std": float(values.std()),
                           "cells": int(values.size)}
    summary["seed_noise"] = seed_noise(records, metric)
    return summary


def summary_markdown(records, metrics=("greedy_accuracy", "sample_reward")) -> str:
    """A markdown table: per method and metric, the mean [min, max], range over the grid, and the seed noise."""
    lines = ["| metric | method | cells | mean | min | max | range (max − min) | seed noise |", "|" + "---|" * 8]
    for metric in metrics:
        summary = robustness_summary(records, metric)
        noise = summary.pop("seed_noise")
        for method, s in summary.items():
            lines.append(f"| {metric} | {method} | {s['cells']} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} "
                         f"| {s['range']:.4f} | {noise:.4f} |")
    return "\n".join(lines) + "\n"


def grid_markdown(records, metric: str) -> str:
    """One markdown table of ``metric`` per cell: a row per (method, β), a column per α and one for the methods
    without α (seed mean, number of seeds in brackets)."""
    tables = grid_table(records, metric)
    alphas = sorted({a for t in tables.values() for a in t["alphas"] if a is not None})
    columns = alphas + [None]
    lines = [f"| {metric}: method | β | " + " | ".join(f"α = {a:g}" for a in alphas) + " | no α |",
             "|" + "---|" * (2 + len(columns))]
    for method, t in tables.items():
        for i, beta in enumerate(t["betas"]):
            cells = []
            for a in columns:
                j = t["alphas"].index(a) if a in t["alphas"] else None
                finite = j is not None and np.isfinite(t["mean"][i, j])
                cells.append(f"{t['mean'][i, j]:.4f} ({t['seeds'][i, j]})" if finite else "")
            lines.append(f"| {method} | {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_grid(records, metric: str, *, label: str | None = None, path=None):
    """Heat maps of ``metric`` over β (rows) x α (columns), one panel per method on one colour scale; α-free
    methods (DPO) are a single column. Each cell prints its seed mean and, in brackets, how many seeds."""
    from nca_kit import plots

    tables = grid_table(records, metric)
    finite = np.concatenate([t["mean"][np.isfinite(t["mean"])] for t in tables.values()])
    return plots.plot_heatmaps(
        {m: (t["mean"], [f"{a:g}" if a is not None else "–" for a in t["alphas"]], [f"{b:g}" for b in t["betas"]],
             t["seeds"]) for m, t in tables.items()},
        vmin=float(finite.min()), vmax=float(finite.max()), xlabel="α (reward temperature)",
        ylabel="β (implicit-reward scale)", colorbar=label or metric,
        title=f"Held-out {label or metric} across the α × β grid (seed mean)", path=path)
