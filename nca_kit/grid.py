"""The tiny-reproduction comparison grid behind ``scripts/run_grid.py``: plan the runs, run them (resuming), and
collect the finished records into a CSV, a table and figures; and the collection of the α × β grid
(:mod:`nca_kit.robustness`).

A run is :func:`nca_kit.experiment.run_experiment` on an :class:`~nca_kit.experiment.ExperimentSpec` (method, K, seed,
plus settings given by their field name or the notebook's upper-case parameter name such as ``STEPS``). A run writes
``<out>/tiny_runs/<run>/`` (``results.json``: the record of :mod:`nca_kit.experiment`). A run whose ``results.json``
exists is skipped, so an interrupted grid resumes; a run in progress in another grid process (``<run>.lock`` with a
live process id) is skipped, so two grid processes can share one output folder (:func:`execute`).

Collected into ``<out>`` (:func:`collect`): ``results.csv`` (one row per run, :func:`nca_kit.experiment.flat_row`),
``results_table.md`` (mean and [min, max] over seeds per method and K), ``results.png``, ``likelihood_trends.png``
(Fig. 5 at this scale), ``k_ablation.png`` (Fig. 4) and, for a sweep of reward sources, ``sources_table.md`` and
``gain_vs_reward.png``. :func:`collect_alpha_beta` writes ``alpha_beta.csv``, ``alpha_beta_table.md`` and one heat
map per held-out metric.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import time
import traceback
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

from nca_kit import robustness
from nca_kit.experiment import METHODS, PAIR_METHODS, ExperimentSpec, flat_row, load_records, run_experiment
from nca_kit.rewards.sources import REWARD_SOURCES

HEADLINE = ("dpo", "infonca", "nca")
EXTRA = tuple(m for m in METHODS if m not in HEADLINE)
__all__ = ["HEADLINE", "EXTRA", "plan_methods", "plan_sources", "parse_value", "specs", "execute", "run_all",
           "collect", "alpha_beta_specs", "collect_alpha_beta"]


def plan_methods(methods, seeds, ks_ablation) -> list[tuple[str, int, int]]:
    """(method, K, seed) in execution order: every method at K = 4 seed by seed, then the K ablation."""
    runs = [(m, 4, s) for s in seeds for m in methods]
    runs += [(m, k, s) for s in seeds for k in ks_ablation for m in ("infonca", "nca") if k != 4]
    return runs


def plan_sources(methods, seeds, sources) -> list[tuple[str, int, int, str]]:
    """(method, K = 4, seed, reward source) in execution order: seed by seed, source by source, every method."""
    for source in sources:
        if source not in REWARD_SOURCES:
            raise SystemExit(f"error: --sources: unknown reward source {source!r}; one of {', '.join(REWARD_SOURCES)}")
    return [(m, 4, s, source) for s in seeds for source in sources for m in methods]


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def spec_overrides(params: dict, sweep: bool = False) -> dict:
    """``-p`` names (a spec field, or the notebook's parameter name: ``STEPS``, ``N_EVAL``) -> spec fields."""
    names = {f.name for f in fields(ExperimentSpec)}
    aliases = {"LR": "lr", "GEN_SEED": "gen_seed", "SMOKE": "smoke"}
    out = {}
    for name, value in params.items():
        field = aliases.get(name, name.lower())
        if field not in names or field in ("method", "k", "seed"):
            raise SystemExit(f"error: -p {name}: not a setting of the grid's runs; one of "
                             + ", ".join(sorted(names - {"method", "k", "seed"})))
        if field == "reward_source" and sweep:
            raise SystemExit(f"error: -p {name}: the reward source is swept by --sources; give one or the other")
        out[field] = value
    return out


def specs(runs, params: dict, smoke: bool) -> list[ExperimentSpec]:
    """The validated spec of every planned run (a bad parameter stops the grid before any run starts); a run is
    ``(method, K, seed)`` or ``(method, K, seed, reward_source)``."""
    out = []
    for method, k, seed, *source in runs:
        try:
            sweep = {"reward_source": source[0]} if source else {}
            spec = ExperimentSpec(method=method, k=k, seed=seed, **sweep, **spec_overrides(params, sweep=bool(source)))
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        out.append(spec.smoke_sized()[0] if smoke else spec)
    return out


def execute(spec: ExperimentSpec, out: Path) -> tuple[bool, float]:
    name = spec.run_name
    if (out / "tiny_runs" / name / "results.json").exists():
        print(f"[skip] {name}: results.json exists", flush=True)
        return True, 0.0
    lock = out / "tiny_runs" / f"{name}.lock"  # several grid processes may share one output folder
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists() and _alive(int(lock.read_text() or 0)):
        print(f"[skip] {name}: running in process {lock.read_text()}", flush=True)
        return True, 0.0
    lock.write_text(str(os.getpid()))
    started = time.time()
    try:
        run_experiment(spec, out=out, reuse_model=True)  # the base weights are loaded once per grid
        ok = True
    except Exception as err:  # report, go on with the next run
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        print(f"[fail] {name}: {last}", flush=True)
        ok = False
    finally:
        lock.unlink(missing_ok=True)
    seconds = time.time() - started
    print(f"[{'done' if ok else 'FAILED'}] {name} in {seconds:.0f} s", flush=True)
    return ok, seconds


def run_all(runs: list[ExperimentSpec], out: Path, params: dict, *, alpha_beta: bool = False) -> list[str]:
    """Every spec through :func:`execute` in order, with progress lines and ``<out>/grid_log.json``; the α × β grid's
    runs go to their cell folders (:func:`nca_kit.robustness.cell_dir`). Returns the names of the failed runs."""
    names = [f"{robustness.cell_dir(out, s).name}/{s.run_name}" if alpha_beta else s.run_name for s in runs]
    print(f"{len(runs)} runs into {out}: " + ", ".join(names), flush=True)
    started = time.time()
    log, failed = [], []
    for i, (spec, name) in enumerate(zip(runs, names), start=1):
        timed = [r["seconds"] for r in log if r["seconds"] > 0]  # runs done here, not skipped as finished
        eta = (f"; about {sum(timed) / len(timed) * (len(runs) - i + 1) / 60:.0f} min left at "
               f"{sum(timed) / len(timed):.0f} s a run") if timed else ""
        print(f"[{i}/{len(runs)}] {name} started at {time.time() - started:.0f} s{eta}", flush=True)
        ok, seconds = execute(spec, robustness.cell_dir(out, spec) if alpha_beta else out)
        log.append({"run": name, "ok": ok, "seconds": round(seconds, 1)})
        if not ok:
            failed.append(name)
        (out / "grid_log.json").write_text(json.dumps({"runs": log, "params": params,
                                                       "wall_seconds": round(time.time() - started, 1)}, indent=1))
    print(f"grid wall time {time.time() - started:.0f} s; failed: {failed or 'none'}", flush=True)
    return failed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------------------------

def group(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], int(row["k"]))].append(row)
    order = {m: i for i, m in enumerate(HEADLINE + EXTRA)}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])))


def spread(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def table_markdown(rows: list[dict]) -> str:
    cols = ("greedy_accuracy", "sample_reward", "sample_accuracy", "kl", "chosen_delta_late", "rejected_delta_late")
    head = ("| method | K | seeds | greedy acc | sample reward | sample acc | KL | Δlog π best (2nd half) "
            "| Δlog π worst (2nd half) |")
    lines = [head, "|" + "---|" * 9]
    base = rows[0] if rows else None
    if base is not None:
        lines.append(f"| base model | – | – | {base['base_greedy_accuracy']:.4f} | {base['base_sample_reward']:.4f} | "
                     f"{base['base_sample_accuracy']:.4f} | 0 | – | – |")
    for (method, k), runs in group(rows).items():
        cells = []
        for c in cols:
            mean, lo, hi = spread([float(r[c]) for r in runs])
            cells.append(f"{mean:.4f}" if len(runs) == 1 else f"{mean:.4f} [{lo:.4f}, {hi:.4f}]")
        lines.append(f"| {method} | {k} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def k_ablation_series(groups: dict) -> tuple[dict, set]:
    """The Fig. 4 curves: held-out sample reward against K for InfoNCA and NCA, ``label -> (K, mean, min, max)``.

    K is compared only on the seeds run at every K (returned as the second value): a K = 4 mean over 3 seeds next to
    single-seed K = 2, 3 would mix seed noise into the trend. Empty when fewer than two K values exist.
    """
    ablation = {key: runs for key, runs in groups.items() if key[0] in ("infonca", "nca")}
    ks = sorted({k for _, k in ablation})
    if len(ks) < 2:
        return {}, set()
    common = set.intersection(*[{int(r["seed"]) for r in runs} for runs in ablation.values()])
    series = {}
    for method in ("infonca", "nca"):
        pts = []
        for k in ks:
            runs = [r for r in ablation.get((method, k), []) if int(r["seed"]) in common]
            if runs:
                pts.append((k, spread([r["sample_reward"] for r in runs])))
        if len(pts) > 1:
            series[method] = ([p[0] for p in pts], [p[1][0] for p in pts], [p[1][1] for p in pts],
                              [p[1][2] for p in pts])
    return series, common


def _beta_label(records: list[dict]) -> str:
    """`` (β = 0.1)`` when every run used the same β, else empty: the Fig. 5 trend depends on it."""
    betas = {r.get("beta") for r in records}
    return f" (β = {betas.pop():g})" if len(betas) == 1 and None not in betas else ""


def figures(rows: list[dict], records: list[dict], out: Path, prefix: str = "") -> list[Path]:
    """``results.png``, ``likelihood_trends.png`` and ``k_ablation.png`` (each where its runs exist) in ``out``, every
    name after ``prefix``."""
    import matplotlib

    matplotlib.use("Agg")
    from nca_kit import plots

    paths = []
    groups = group(rows)
    k4 = {key: runs for key, runs in groups.items() if key[1] == 4 or key[0] in PAIR_METHODS}
    if k4:
        base = rows[0]
        names = ["base model"] + [f"{m} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
                                  for (m, _), runs in k4.items()]
        series = {}
        for metric, label in (("greedy_accuracy", "greedy accuracy"), ("sample_accuracy", "sample accuracy")):
            stats = [spread([r[metric] for r in runs]) for runs in k4.values()]
            series[label] = ([base[f"base_{metric}"]] + [s[0] for s in stats],
                             [(0.0, 0.0)] + [(s[0] - s[1], s[2] - s[0]) for s in stats])
        path = out / f"{prefix}results.png"
        plots.plot_error_bars(names, series, xlabel="method (K = 4; pairs for dpo / pair_nca)",
                              ylabel="held-out fraction correct",
                              title="Held-out accuracy by method (mean, min-max over seeds)", path=path)
        paths.append(path)
    by_run = {r["run"]: r for r in records}
    trend_series = {}
    for (method, k), runs in k4.items():
        if method not in HEADLINE:  # the table has the baselines' numbers; twelve lines would hide the point
            continue
        trends = [by_run[r["run"]]["trend"] for r in runs]
        n = min(len(t["chosen"]) for t in trends)
        if n == 0:
            continue
        steps = trends[0]["step"][:n]
        for which, label in (("chosen", "best"), ("rejected", "worst")):
            columns = list(zip(*[t[which][:n] for t in trends]))
            mean = [sum(c) / len(c) for c in columns]
            trend_series[f"{method}: {label} answer"] = (steps, mean, [min(c) for c in columns],
                                                        [max(c) for c in columns])
    if trend_series:
        path = out / f"{prefix}likelihood_trends.png"
        plots.plot_band_lines(trend_series, hline=(0.0, "reference (step 0)"), xlabel="optimizer step",
                              ylabel="log π(y|x) − log μ(y|x) on the step's prompts [nats]",
                              title=f"Fig. 5 at 135M{_beta_label(records)}: likelihood of the best / worst "
                                    "training answer", path=path)
        paths.append(path)
    series, common = k_ablation_series(groups)
    if series:
        seeds = ("seed " if len(common) == 1 else "seeds ") + ", ".join(str(s) for s in sorted(common))
        path = out / f"{prefix}k_ablation.png"
        plots.plot_band_lines(series, xlabel="K (responses per prompt: best + K-1 others)",
                              ylabel="held-out mean sample reward (0-10)",
                              xticks=sorted({k for xs, *_ in series.values() for k in xs}),
                              title=f"Fig. 4 at 135M: does a larger K help? ({seeds})", path=path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Reward sources: one row per (method, source), and gain against reward quality
# --------------------------------------------------------------------------------------------------------------------

SOURCE_COLUMNS = (("reward_accuracy", "reward pair acc"), ("reward_spearman", "reward ρ"),
                  ("greedy_accuracy", "greedy acc"), ("greedy_gain", "Δ greedy acc"),
                  ("sample_reward", "sample reward"), ("sample_gain", "Δ sample reward"), ("kl", "KL"),
                  ("chosen_delta_late", "Δlog π best (2nd half)"), ("rejected_delta_late", "Δlog π worst (2nd half)"))


def source_groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (method, reward source), sources in :data:`REWARD_SOURCES` order; each row gains ``greedy_gain`` and
    ``sample_gain`` (trained minus base model on the same held-out prompts)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        row = {**row, "greedy_gain": float(row["greedy_accuracy"]) - float(row["base_greedy_accuracy"]),
               "sample_gain": float(row["sample_reward"]) - float(row["base_sample_reward"])}
        groups[(row["method"], row["reward_source"])].append(row)
    order = {m: i for i, m in enumerate(HEADLINE + EXTRA)}
    sources = {s: i for i, s in enumerate(REWARD_SOURCES)}
    return dict(sorted(groups.items(), key=lambda kv: (sources.get(kv[0][1], 99), order.get(kv[0][0], 99))))


def sources_table_markdown(rows: list[dict]) -> str:
    """Mean [min, max] over seeds per (method, reward source); the base model's held-out numbers first."""
    lines = ["| method | reward source | seeds | " + " | ".join(label for _, label in SOURCE_COLUMNS) + " |",
             "|" + "---|" * (3 + len(SOURCE_COLUMNS))]
    base = rows[0]
    lines.append(f"| base model | – | – | – | – | {float(base['base_greedy_accuracy']):.4f} | 0 | "
                 f"{float(base['base_sample_reward']):.4f} | 0 | 0 | – | – |")
    for (method, source), runs in source_groups(rows).items():
        cells = []
        for c, _ in SOURCE_COLUMNS:
            mean, lo, hi = spread([float(r[c]) for r in runs])
            cells.append(f"{mean:.4f}" if len(runs) == 1 else f"{mean:.4f} [{lo:.4f}, {hi:.4f}]")
        lines.append(f"| {method} | {source} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gain_figure(rows: list[dict], path: Path) -> Path:
    """Held-out gain over the base model against the reward source's pairwise accuracy on the training answers,
    one marker per method, min-max bars over seeds."""
    from nca_kit import plots

    points = defaultdict(list)
    for (method, source), runs in source_groups(rows).items():
        x = spread([float(r["reward_accuracy"]) for r in runs])
        ys = []
        for c in ("greedy_gain", "sample_gain"):
            mean, lo, hi = spread([float(r[c]) for r in runs])
            ys.append((mean, (mean - lo, hi - mean)))
        points[f"{method}"].append((f"{source} ({len(runs)})", x[0], (x[0] - x[1], x[2] - x[0]), ys))
    plots.plot_gain_vs_quality(
        dict(points), xlabel="reward source: pairwise accuracy against the rubric (training answers)",
        ylabels=("held-out greedy accuracy − base model", "held-out sample reward − base model (0-10)"),
        title="Does a better reward give a better policy? (mean, min-max over seeds; (n) = seeds)", path=path)
    return path


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per run (:func:`nca_kit.experiment.flat_row`), columns in the first row's order."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def collect(out: Path, docs: Path | None, prefix: str = "tiny_", records_dir: Path | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    records = load_records(out)
    if not records:
        print(f"no results.json under {out / 'tiny_runs'}")
        return
    if records_dir is not None:
        written = export_records(out, records_dir)
        print(f"wrote {len(written)} records into {records_dir} (then `python -m nca_kit.report` rebuilds the page)")
    all_rows = [flat_row(r) for r in records]
    write_csv(out / "results.csv", all_rows)
    paths = []
    if any(r["reward_source"] != "rubric" for r in all_rows):  # a sweep of reward sources
        table = sources_table_markdown(all_rows)
        (out / "sources_table.md").write_text(table)
        print(table)
        paths.append(gain_figure(all_rows, out / "gain_vs_reward.png"))
    rows = [r for r in all_rows if r["reward_source"] == "rubric"]  # the method comparison: golden rewards
    records = [r for r in records if r.get("reward_source", "rubric") == "rubric"]
    if not rows:
        print(f"wrote {out / 'results.csv'}, " + ", ".join(str(p) for p in paths))
        return
    table = table_markdown(rows)
    (out / "results_table.md").write_text(table)
    paths += figures(rows, records, out)
    print(table)
    print(f"wrote {out / 'results.csv'}, {out / 'results_table.md'}, " + ", ".join(str(p) for p in paths))
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, docs / f"{prefix}{p.name}")
        print(f"copied figures to {docs}")


# --------------------------------------------------------------------------------------------------------------------
# The alpha x beta grid (Fig. 6/8)
# --------------------------------------------------------------------------------------------------------------------



def alpha_beta_specs(alphas, betas, seeds, methods, params: dict, smoke: bool = False) -> list[ExperimentSpec]:
    """The validated specs of the α × β grid: ``methods`` split into those swept over α × β and over β only."""
    try:
        base = ExperimentSpec(**spec_overrides(params))
        cells = robustness.plan(alphas, betas, seeds, methods=[m for m in methods if robustness.uses_alpha(m)],
                                beta_methods=[m for m in methods if not robustness.uses_alpha(m)])
        runs = robustness.grid_specs(cells, base)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return [spec.smoke_sized()[0] for spec in runs] if smoke else runs


def export_records(out: Path, records_dir: Path) -> list[Path]:
    """Each finished run's record as a small committed file: ``<out>/tiny_runs/<run>/results.json`` (a plain or
    sources grid) -> ``<records_dir>/<run>.json``, ``<out>/<cell>/tiny_runs/<run>/results.json`` (the α × β grid) ->
    ``<records_dir>/<cell>/<run>.json``. The record keeps everything but ``paths`` (they name this machine's run
    folders) and gains ``log``: the run's per-step training log (``metrics.jsonl``: loss, implicit rewards per slot,
    log-probs), which some pages quote."""
    written = []
    out, records_dir = Path(out), Path(records_dir)
    found = [(p, records_dir) for p in sorted(out.glob("tiny_runs/*/results.json"))]
    found += [(p, records_dir / p.parents[2].name) for p in sorted(out.glob("*/tiny_runs/*/results.json"))]
    for path, folder in found:
        record = json.loads(path.read_text())
        record.pop("paths", None)
        log = path.parent / "metrics.jsonl"
        if log.exists():
            record["log"] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        target = folder / f"{path.parent.name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        written.append(target)
    return written


def collect_alpha_beta(out: Path, docs: Path | None, records_dir: Path | None = None) -> None:
    records = robustness.load_grid_records(out)
    if not records:
        print(f"no results.json under {out}/*/tiny_runs")
        return
    if records_dir is not None:
        written = export_records(out, records_dir)
        print(f"wrote {len(written)} records into {records_dir} (then `python -m nca_kit.report` rebuilds the page)")
    rows = [flat_row(r) for r in records]
    write_csv(out / "alpha_beta.csv", rows)
    table = robustness.summary_markdown(records, tuple(robustness.METRIC_LABELS)) + "".join(
        "\n" + robustness.grid_markdown(records, m) for m in robustness.METRIC_LABELS)
    (out / "alpha_beta_table.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    for metric, label in robustness.METRIC_LABELS.items():
        path = out / f"alpha_beta_{metric}.png"
        robustness.plot_grid(records, metric, label=label, path=path)
        paths.append(path)
    print(table)
    print(f"wrote {out / 'alpha_beta.csv'}, {out / 'alpha_beta_table.md'}, " + ", ".join(str(p) for p in paths))
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, docs / p.name)
        print(f"copied figures to {docs}")
