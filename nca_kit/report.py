r"""Results pages from committed records: one command rebuilds every generated table and figure in ``docs/``.

    python -m nca_kit.report                 # rewrite the generated pages, blocks and figures from results/
    python -m nca_kit.report --check         # rebuild into a temporary folder; exit 1 if a committed page differs

What it reads and writes (every number it prints comes from these inputs, nothing else):

* ``results/horizon/*.json`` — the long-horizon likelihood runs of ``scripts/run_horizon.py`` (one record per run;
  ``*.partial.json``: a run still in progress, its curves up to its last checkpoint) →
  ``docs/results_horizon.md`` (the whole page) and ``docs/horizon_likelihood.png``, ``docs/horizon_accuracy.png``.
* ``notebooks/10_embedding_reward_models.ipynb`` — its stored output of the paired CLF − BT accuracies (mean ± one
  standard error over 3 paired seeds) → the generated block ``embedding_verdicts`` of ``docs/results_rewards.md``:
  the same effects with Student-t 95 % intervals and the words of :func:`nca_kit.stats.verdict`; and its printed
  study tables (accuracy, Spearman, Best-of-4, order consistency per head and flip rate; the synthetic check) → the
  generated block ``embedding_tables`` of the same page.
* ``results/flr_eval/results.json`` — ``scripts/flr_eval.py``'s record (every HH response's FLR and Direct reward,
  the arithmetic table) → the generated block ``flr_tables`` of ``docs/results_rewards.md``: accuracies with Wilson
  intervals and each FLR variant minus Direct with a paired bootstrap interval and its verdict.
* ``results/tiny_grid/``, ``results/tiny_grid_beta1/``, ``results/loop/``, ``results/alpha_beta/`` — the run records of
  ``scripts/run_grid.py --records`` → the grid pages' generated blocks and figures, by :mod:`nca_kit.report_grids`
  (its docstring lists which record feeds which block).

A generated block sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``; the rest of a page is prose
and is left alone. The statistics are :mod:`nca_kit.stats`; the rule that turns an interval into words is written in
``docs/results_stats.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from nca_kit import report_grids as grids
from nca_kit import stats

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m nca_kit.report"
HORIZON_CONFIGS = (("dpo", None), ("infonca", 0.01), ("nca", 0.01), ("infonca", 1.0), ("nca", 1.0))
#: the paper's claim about the chosen (best-reward) response's log-likelihood under each method (Fig. 2 / 5):
#: -1 it falls, +1 it does not fall (the verdict tests a rise; an interval containing 0 is "not observed").
CHOSEN_CLAIM = {"dpo": -1, "infonca": -1, "nca": 1}
SMOOTH = 10  # steps of the moving average drawn over the per-step curves (one prompt per step is noisy)


# --------------------------------------------------------------------------------------------------------------------
# Long-horizon likelihood runs
# --------------------------------------------------------------------------------------------------------------------


def load_horizon(folder: Path) -> list[dict]:
    """Finished records, and partial ones where no finished record of that run exists, sorted by run name."""
    done = {p.name[:-len(".json")]: p for p in folder.glob("*.json") if not p.name.endswith(".partial.json")}
    partial = {p.name[:-len(".partial.json")]: p for p in folder.glob("*.partial.json")}
    paths = {**partial, **done}
    return [json.loads(paths[name].read_text()) for name in sorted(paths)]


def config_label(method: str, alpha) -> str:
    return method.upper() if alpha is None else f"{'InfoNCA' if method == 'infonca' else 'NCA'} α={alpha:g}"


def _per_100(x) -> float:
    return 100 * x


def run_summary(record: dict) -> dict:
    c = record["curves"]
    steps = np.array(c["step"], dtype=float)
    out = {"run": record["run"], "method": record["method"], "alpha": record["alpha"], "seed": record["seed"],
           "done": record.get("status") == "done", "last_step": int(steps.max()) if len(steps) else 0}
    for key in ("chosen", "rejected", "mean"):
        y = np.array([math.nan if v is None else v for v in c[key]], dtype=float)
        out[f"{key}_slope"] = _per_100(stats.slope(steps, y)) if len(steps) >= 2 else math.nan
        tail = y[len(y) * 2 // 3:]
        out[f"{key}_late"] = float(np.nanmean(tail)) if len(tail) else math.nan
    margin = np.array(c["margin"], dtype=float)
    out["margin_late"] = float(np.nanmean(margin[len(margin) * 2 // 3:])) if len(margin) else math.nan
    held = record["heldout"]
    out["acc_base"] = held["accuracy"][0] if held["step"] and held["step"][0] == 0 else math.nan
    out["acc_last"] = held["accuracy"][-1] if held["accuracy"] else math.nan
    out["acc_last_correct"] = sum(held["correct"][-1]) if held["correct"] else 0
    out["n_heldout"] = held["n_prompts"]
    out["wall_seconds"] = record.get("wall_seconds")
    return out


def _interval_text(values) -> tuple[str, dict]:
    if not values:
        return "–", {}
    t = stats.t_interval(values)
    if t["n"] < 2:
        return f"{t['mean']:+.2f} (1 seed, no interval)", t
    return f"{t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}]", t


def horizon_page(records: list[dict], figure_dir: Path, page: Path) -> None:
    """``docs/results_horizon.md`` and its two figures from the long-horizon records."""
    summaries = [run_summary(r) for r in records]
    finished = [s for s in summaries if s["done"]]
    lines = [
        "# The likelihood claim at a longer horizon (Fig. 2 / 5 at 135M)",
        "",
        f"Generated by `{COMMAND}` from the run records in `results/horizon/` (one JSON file per run, written by",
        "`scripts/run_horizon.py`); do not edit by hand. How intervals become words: `docs/results_stats.md`.",
        "",
        "**Claim (paper, Fig. 2 / 5):** under DPO and InfoNCA the log-likelihood of the chosen (best-reward) response",
        "falls during training; under NCA it does not.",
        "",
        "**Setup:** SmolLM2-135M-Instruct with LoRA on the kit's arithmetic K = 4 data",
        "(`data/arith_smollm2-135m-instruct_k4_472b54c0acde.json`, rubric rewards); DPO on one Zephyr pair per prompt,",
        "InfoNCA and NCA on the K = 4 answers at α = 0.01 and α = 1; β, learning rate, steps, prompts per step and the",
        "held-out set as in each record's `spec` (listed below). Each step trains on fresh prompts, so the logged",
        "log-likelihoods are those of the step's own training batch (`log π − log μ`, from the loss's forward: the",
        "change since step 0, because the reference is the step-0 policy). The slope is the least-squares slope of a",
        "run's per-step curve, in nats per 100 steps; the interval is the Student-t 95 % interval over seeds.",
        "",
    ]
    if not records:
        lines += ["No records yet.", ""]
        page.write_text("\n".join(lines))
        return
    specs = {(r["lr"], r["beta"], r["steps"], r["batch"], r["heldout"]["n_prompts"]) for r in records}
    for lr, beta, steps, batch, n_held in sorted(specs):
        lines.append(f"Settings: lr {lr:g} (cosine, 10 % warmup), β {beta:g}, {steps} optimizer steps of {batch} "
                     f"prompt(s), held-out greedy accuracy on {n_held} fixed test prompts.")
    lines += ["", "Command (resumable; a finished run is skipped, an interrupted one resumes from its last checkpoint):",
              "", "```bash", "OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/run_horizon.py --out runs/horizon "
              "--records results/horizon", f"{COMMAND}", "```", ""]

    n_partial = len(summaries) - len(finished)
    lines += [f"**Runs:** {len(finished)} finished of the {len(HORIZON_CONFIGS) * 3} planned "
              f"(5 configurations × 3 seeds)" + (f", {n_partial} partial (curves up to the step shown; not used "
                                                 "for the verdicts)." if n_partial else "."), ""]
    lines += ["| run | status | steps logged | chosen slope | rejected slope | mean slope | chosen, last third | "
              "margin, last third | held-out acc (base → last) | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        wall = "–" if s["wall_seconds"] is None else f"{s['wall_seconds']:.0f}"
        lines.append(f"| {s['run']} | {'done' if s['done'] else 'partial'} | {s['last_step']} | "
                     f"{s['chosen_slope']:+.2f} | {s['rejected_slope']:+.2f} | {s['mean_slope']:+.2f} | "
                     f"{s['chosen_late']:+.2f} | {s['margin_late']:+.3f} | {s['acc_base']:.3f} → {s['acc_last']:.3f} "
                     f"| {wall} |")
    lines += ["", "Slopes in nats per 100 steps; \"last third\": mean over the last third of the logged steps.", ""]

    lines += ["## Verdicts (finished runs only)", "",
              "| configuration | seeds | chosen slope [95 % t] | claim | verdict | rejected slope | mean slope | "
              "held-out acc, last [Wilson 95 %, pooled over seeds] |", "|---|---|---|---|---|---|---|---|"]
    by_config = {}
    for method, alpha in HORIZON_CONFIGS:
        runs = [s for s in finished if s["method"] == method and s["alpha"] == alpha]
        by_config[(method, alpha)] = {s["seed"]: s for s in runs}
        if not runs:
            lines.append(f"| {config_label(method, alpha)} | 0 | – | – | not run yet | – | – | – |")
            continue
        chosen, t = _interval_text([s["chosen_slope"] for s in runs])
        rejected, _ = _interval_text([s["rejected_slope"] for s in runs])
        mean, _ = _interval_text([s["mean_slope"] for s in runs])
        claim = "falls" if CHOSEN_CLAIM[method] < 0 else "does not fall"
        words = stats.verdict(t.get("low", math.nan), t.get("high", math.nan), CHOSEN_CLAIM[method])
        if CHOSEN_CLAIM[method] > 0:  # "does not fall": a rise holds it, a fall reverses it
            words = {"holds": "holds (rises)", "reversed": "reversed (falls)"}.get(words, words)
        correct = sum(s["acc_last_correct"] for s in runs)
        n = sum(s["n_heldout"] for s in runs)
        w = stats.wilson(correct, n)
        lines.append(f"| {config_label(method, alpha)} | {len(runs)} | {chosen} | {claim} | {words} | {rejected} | "
                     f"{mean} | {w['p']:.3f} [{w['low']:.3f}, {w['high']:.3f}] (n = {n}) |")
    lines += [""]
    lines += ["NCA − InfoNCA, chosen slope, paired by seed (same seed: same LoRA initialisation, data order and",
              "responses); the claim predicts a positive difference:", ""]
    for alpha in (0.01, 1.0):
        nca, info = by_config[("nca", alpha)], by_config[("infonca", alpha)]
        seeds = sorted(set(nca) & set(info))
        if not seeds:
            lines.append(f"* α = {alpha:g}: no seed with both runs finished yet.")
            continue
        diffs = [nca[s]["chosen_slope"] - info[s]["chosen_slope"] for s in seeds]
        text, t = _interval_text(diffs)
        words = stats.verdict(t.get("low", math.nan), t.get("high", math.nan), 1)
        lines.append(f"* α = {alpha:g}: {text} nats per 100 steps over seeds {seeds}: **{words}**.")
    lines += [""]
    walls = [s["wall_seconds"] for s in finished if s["wall_seconds"] is not None]
    if walls:
        lines += [f"Wall time: {sum(walls):.0f} s over the {len(walls)} finished runs ({min(walls):.0f}–"
                  f"{max(walls):.0f} s per run), one thread pinned to one core of the shared 2-core machine while "
                  "other jobs ran (the records hold `cpu_seconds` as well).", ""]
    lines += ["![log-likelihood curves](horizon_likelihood.png)", "", "![held-out accuracy](horizon_accuracy.png)", ""]
    page.write_text("\n".join(lines))
    _horizon_figures(records, figure_dir)


def _smooth(y: np.ndarray, window: int = SMOOTH) -> np.ndarray:
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        chunk = y[max(0, i - window + 1):i + 1]
        out[i] = np.nanmean(chunk) if np.isfinite(chunk).any() else np.nan
    return out


def _horizon_figures(records: list[dict], figure_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    colors = dict(zip([config_label(m, a) for m, a in HORIZON_CONFIGS], plt.cm.tab10.colors))
    for ax, key, title in zip(axes, ("chosen", "rejected", "mean"),
                              ("chosen (best-reward) response", "rejected (worst-reward) response",
                               "mean over the K responses")):
        for method, alpha in HORIZON_CONFIGS:
            runs = [r for r in records if r["method"] == method and r["alpha"] == alpha]
            if not runs:
                continue
            length = min(len(r["curves"]["step"]) for r in runs)
            steps = np.array(runs[0]["curves"]["step"][:length], dtype=float)
            ys = np.array([_smooth(np.array(r["curves"][key][:length], dtype=float)) for r in runs])
            label = config_label(method, alpha) + f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            ax.plot(steps, ys.mean(0), color=colors[config_label(method, alpha)], label=label)
            if len(runs) > 1:
                ax.fill_between(steps, ys.min(0), ys.max(0), color=colors[config_label(method, alpha)], alpha=0.2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel(f"log π − log μ (nats), {SMOOTH}-step moving average")
    axes[0].legend(fontsize=8)
    fig.suptitle("Log-likelihood change of the training batch's responses: seed mean, band = min–max over seeds")
    fig.tight_layout()
    fig.savefig(figure_dir / "horizon_likelihood.png", dpi=110, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, alpha in HORIZON_CONFIGS:
        runs = [r for r in records if r["method"] == method and r["alpha"] == alpha]
        if not runs:
            continue
        length = min(len(r["heldout"]["step"]) for r in runs)
        steps = np.array(runs[0]["heldout"]["step"][:length], dtype=float)
        ys = np.array([r["heldout"]["accuracy"][:length] for r in runs], dtype=float)
        ax.plot(steps, ys.mean(0), marker="o", color=colors[config_label(method, alpha)],
                label=config_label(method, alpha) + f" ({len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=colors[config_label(method, alpha)], alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("Held-out accuracy (seed mean, min–max band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure_dir / "horizon_accuracy.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Generated blocks inside hand-written pages
# --------------------------------------------------------------------------------------------------------------------


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block ``name`` replaced by ``body`` (the markers must exist, once each)."""
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"block {name}: expected one {start} and one {end}")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"


_EMBEDDING_LINE = re.compile(r"^(arith|hh)\s+(mlp|lgbm)\s*: CLF - BT accuracy at 0: ([+-]?\d+\.\d+) ± (\d+\.\d+); "
                             r"at 0\.4: ([+-]?\d+\.\d+) ± (\d+\.\d+)$")


def embedding_effects(notebook: Path) -> list[dict]:
    """The paired CLF − BT accuracy effects (mean, standard error over 3 paired seeds) stored in notebook 10."""
    nb = json.loads(notebook.read_text())
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            for line in "".join(o.get("text", "")).splitlines():
                m = _EMBEDDING_LINE.match(line.strip())
                if m:
                    data, head = m.group(1), m.group(2)
                    for flip, mean, se in ((0.0, m.group(3), m.group(4)), (0.4, m.group(5), m.group(6))):
                        out.append({"data": data, "head": head, "flip": flip, "mean": float(mean),
                                    "se": float(se), "n": 3})
    if not out:
        raise ValueError(f"{notebook}: no stored 'CLF - BT accuracy' lines (run the notebook with --store)")
    return out


def embedding_block(notebook: Path) -> str:
    from scipy import stats as st

    t975 = float(st.t.ppf(0.975, df=2))
    lines = [f"Generated by `{COMMAND}` from the stored output of `notebooks/10_embedding_reward_models.ipynb` (paired",
             "CLF − BT held-out accuracy, mean ± one standard error over 3 paired seeds; the per-seed values are not",
             f"stored, so the 95 % interval is mean ± t(0.975, 2 df) · SE = mean ± {t975:.2f} · SE).", "",
             "| data | heads | flip rate | CLF − BT [95 % t] | claim: CLF ≥ BT, more so with noise | verdict |",
             "|---|---|---|---|---|---|"]
    for e in embedding_effects(notebook):
        low, high = e["mean"] - t975 * e["se"], e["mean"] + t975 * e["se"]
        claim = "CLF beats BT" if e["flip"] > 0 else "CLF matches BT"
        words = stats.verdict(low, high, 1)
        if e["flip"] == 0:  # "matches": an interval containing 0 is consistent with it
            words = "consistent (interval contains 0)" if low <= 0 <= high else \
                ("CLF better" if low > 0 else "CLF worse")
        lines.append(f"| {e['data']} | {e['head']} | {e['flip']:.1f} | {stats.fmt_interval(e['mean'], low, high)} | "
                     f"{claim} | {words} |")
    return "\n".join(lines)


_STUDY_HEADER = re.compile(r"^-- (.+?) \(mean ± std over (\d+) seeds; columns: (.+)\)$")
_DATA_HEADER = re.compile(r"^== (\w+): ")


def _stream_text(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _printed_frame(lines: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """A pandas frame as printed by ``DataFrame.to_string`` (a column line, an index-name line, then rows)."""
    columns = lines[0].split()[1:]
    rows = []
    for line in lines[2:]:
        if not line.strip() or line.startswith(("--", "==")):
            break
        head, rest = line.split(None, 1)
        cells = [c.strip() for c in re.split(r"\s{2,}", rest.strip())]
        rows.append((head, cells))
    return columns, rows


def embedding_tables(notebook: Path) -> dict:
    """The study tables printed in notebook 10's stored outputs: ``{(data, metric name): (columns, rows)}`` plus
    ``"synthetic"`` and ``"best_of_k_reference"``."""
    nb = json.loads(notebook.read_text())
    out: dict = {}
    for cell in nb["cells"]:
        lines = _stream_text(cell).splitlines()
        data = None
        for i, line in enumerate(lines):
            if line.startswith("held-out pairwise accuracy, synthetic"):
                out["synthetic"] = _printed_frame(lines[i + 1:])
            m = _DATA_HEADER.match(line)
            if m:
                data = m.group(1)
            m = _STUDY_HEADER.match(line)
            if m and data:
                out[(data, m.group(1))] = _printed_frame(lines[i + 1:]) + (int(m.group(2)),)
            if line.startswith("-- Best-of-4 reference:"):
                out["best_of_k_reference"] = line[3:]
    if not any(isinstance(k, tuple) for k in out):
        raise ValueError(f"{notebook}: no stored study tables (run the notebook with --store)")
    return out


def embedding_tables_block(notebook: Path) -> str:
    from nca_kit.rewards.metrics import METRIC_NAMES

    tables = embedding_tables(notebook)
    lines = [f"Generated by `{COMMAND}` from the stored output of `notebooks/10_embedding_reward_models.ipynb` "
             "(MiniLM embeddings; each cell: mean ± std over the seeds, std with n − 1).", ""]

    def table(title: str, key: tuple, label) -> None:
        columns, rows, seeds = tables[key]
        lines.extend([f"**{title}** ({seeds} seeds)", "", "| head | " + " | ".join(label(c) for c in columns) + " |",
                      "|---|" + "---|" * len(columns)])
        lines.extend(f"| `{head}` | " + " | ".join(cells) + " |" for head, cells in rows)
        lines.append("")

    flips = lambda c: f"flip {float(c):g}"  # noqa: E731
    for data in ("arith", "hh"):
        if (data, METRIC_NAMES["accuracy"]) in tables:
            table(f"{data}: held-out pairwise accuracy against the golden order", (data, METRIC_NAMES["accuracy"]),
                  flips)
    for metric in ("spearman", "bon_picked", "order_consistency"):
        if ("arith", METRIC_NAMES[metric]) in tables:
            table(f"arith: {METRIC_NAMES[metric]}", ("arith", METRIC_NAMES[metric]), flips)
    if "best_of_k_reference" in tables:
        lines += [f"arith {tables['best_of_k_reference']} (rubric 0–10).", ""]
    if "synthetic" in tables:
        columns, rows = tables["synthetic"]
        lines.extend(["**synthetic linear reward: held-out pairwise accuracy** (seed 0)", "",
                      "| head | " + " | ".join(flips(c) for c in columns) + " |", "|---|" + "---|" * len(columns)])
        lines.extend(f"| `{head}` | " + " | ".join(c.split(" ± ")[0] for c in cells) + " |" for head, cells in rows)
    return "\n".join(lines).rstrip()


def flr_block(record_path: Path) -> str:
    """The FLR tables of ``docs/results_rewards.md`` from ``results/flr_eval/results.json`` (``scripts/flr_eval.py``):
    HH-RLHF pairwise accuracy (Wilson) recomputed from every response's stored reward, each variant minus Direct on
    the same pairs (paired bootstrap) with its verdict, and the arithmetic table as the run recorded it."""
    from nca_kit.rewards import metrics

    if not record_path.exists():
        return (f"No FLR record yet: run the command below to write `{record_path.relative_to(REPO)}`, then "
                f"`{COMMAND}`.")
    record = json.loads(record_path.read_text())
    lines = [f"Generated by `{COMMAND}` from `results/flr_eval/results.json` (`{record['command']}`, "
             f"{record['model']}, {record.get('wall_seconds', float('nan')) / 60:.0f} min wall).", ""]
    hh = record.get("hh")
    if hh:
        rewards = {tuple(k.split(" | ")): np.asarray(v) for k, v in hh["rewards"].items()}
        wins = {k: metrics.pair_wins(*metrics.chosen_rejected(r[0::2], r[1::2])) for k, r in rewards.items()}
        acc = {k: metrics.accuracy_interval(w) for k, w in wins.items()}
        n = hh["n_pairs"]
        scorers = list(dict.fromkeys(s for s, _ in rewards))
        lines += [f"**HH-RLHF harmless-base test**, {n} pairs (seed {hh['seed']}), pairwise accuracy against the "
                  "human label [95 % Wilson]:", "",
                  "| scorer | all categories | best single category | minus Direct, same pairs [95 % paired bootstrap]"
                  " | claim: FLR > Direct |", "|---|---|---|---|---|"]
        direct = wins[("Direct", "-")]
        for scorer in scorers:
            a = acc[(scorer, "all")] if (scorer, "all") in acc else acc[(scorer, "-")]
            cell = f"{a['accuracy']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"
            cats = {c: acc[(s, c)] for s, c in acc if s == scorer and c not in ("all", "-")}
            if not cats:
                lines.append(f"| {scorer} | {cell} | – | – | – |")
                continue
            best = max(cats, key=lambda c: cats[c]["accuracy"])
            d = metrics.accuracy_difference(wins[(scorer, "all")], direct)
            lines.append(f"| {scorer} | {cell} | {best} {cats[best]['accuracy']:.3f} | "
                         f"{stats.fmt_interval(d['difference'], d['low'], d['high'])} | "
                         f"{stats.verdict(d['low'], d['high'], 1)} |")
        variants = [s for s in scorers if s != "Direct"]
        categories = [c for s, c in acc if s == variants[0] and c not in ("all", "-")]
        lines += ["", "Per category (" + " / ".join(f"`{v[5:-1]}`" for v in variants) + "): " + ", ".join(
            f"{c} " + " / ".join(f"{acc[(v, c)]['accuracy']:.3f}" for v in variants) for c in categories) + "."]
        dis = hh["disagreement"]
        lines += ["", f"`paper` and `code` order {dis['pairs_ordered_differently']:.1%} of the pairs differently "
                  f"(Spearman of their rewards {dis['spearman_rewards']:+.2f}, of their chosen − rejected margins "
                  f"{dis['spearman_margins']:+.2f})."]
    arith = record.get("arith")
    if arith:
        rows = arith["table"]
        lines += ["", f"**The kit's arithmetic K = {arith['k']} answers**, {arith['n_prompts']} prompts, "
                  f"{rows[0]['n_pairs']} pairs with different rubric rewards, {rows[0]['n_correct_pairs']} of them "
                  "correct vs wrong; FLR with the arithmetic correctness follow-ups:", "",
                  f"| scorer | Spearman with the rubric (mean over {rows[0]['n_spearman']} prompts without ties) | "
                  "pairwise accuracy [95 % Wilson] | correct vs wrong [95 % Wilson] | Best-of-4 rubric reward |",
                  "|---|---|---|---|---|"]
        for r in rows:
            if r["category"] not in ("-", "all"):
                continue
            lines.append(f"| {r['scorer']} | {r['spearman']:+.3f} | "
                         f"{r['pair_accuracy']:.3f} [{r['pair_low']:.3f}, {r['pair_high']:.3f}] | "
                         f"{r['correct_pair_accuracy']:.3f} [{r['correct_pair_low']:.3f}, {r['correct_pair_high']:.3f}] "
                         f"| {r['best_of_k']:.2f} |")
        lines += ["", f"Random pick {rows[0]['random']:.2f}, oracle pick {rows[0]['oracle']:.2f} (rubric 0–10)."]
    return "\n".join(lines)


def flr_figures(record_path: Path, docs: Path) -> list[Path]:
    """The FLR figures of ``docs/results_rewards.md`` drawn from ``results/flr_eval/results.json``: HH-RLHF pairwise
    accuracy by category, the reward histograms of FLR (``paper``) and Direct, and the arithmetic scorers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from nca_kit import plots

    record = json.loads(record_path.read_text())
    paths = []
    if record.get("hh"):
        hh = record["hh"]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        plots.plot_pair_accuracy(pd.DataFrame(hh["table"]), ax, title=f"HH-RLHF harmless-base, {record['model']}")
        paths.append(docs / "rewards_flr_hh_accuracy.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        plots.plot_reward_histograms(hh["rewards"]["FLR (paper) | all"], hh["rewards"]["Direct | -"], "paper", axes)
        paths.append(docs / "rewards_flr_hh_distributions.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
    if record.get("arith"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        plots.plot_k_response_scorers(pd.DataFrame(record["arith"]["table"]), record["arith"]["n_prompts"], axes)
        paths.append(docs / "rewards_flr_arith.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


def build(repo: Path, docs: Path) -> list[Path]:
    """Write every generated page, block and figure into ``docs`` (a copy of ``repo/docs`` or the folder itself);
    returns the files written."""
    written = []
    horizon = docs / "results_horizon.md"
    horizon_page(load_horizon(repo / "results" / "horizon"), docs, horizon)
    written += [horizon]
    if (docs / "horizon_likelihood.png").exists():
        written += [docs / "horizon_likelihood.png", docs / "horizon_accuracy.png"]
    rewards = docs / "results_rewards.md"
    notebook10 = repo / "notebooks" / "10_embedding_reward_models.ipynb"
    text = replace_block(rewards.read_text(), "embedding_verdicts", embedding_block(notebook10))
    text = replace_block(text, "embedding_tables", embedding_tables_block(notebook10))
    flr_record = repo / "results" / "flr_eval" / "results.json"
    if flr_record.exists():  # until scripts/flr_eval.py has written its record, the page keeps its logged tables
        text = replace_block(text, "flr_tables", flr_block(flr_record))
        written += flr_figures(flr_record, docs)
    loop = grids.load_run_records(repo / "results" / "loop")
    if loop:
        text = replace_block(text, "loop_table", grids.loop_table_block(loop, "results/loop/"))
        text = replace_block(text, "loop_verdicts", grids.loop_verdicts_block(loop, "results/loop/"))
        written += grids.loop_figure(loop, docs)
    rewards.write_text(text)
    written += [rewards]

    tiny_page = docs / "results_tiny.md"
    text = tiny_page.read_text()
    tiny = grids.load_run_records(repo / "results" / "tiny_grid")
    if tiny:
        folder = "results/tiny_grid/"
        text = replace_block(text, "tiny_table", grids.tiny_table_block(tiny, folder))
        text = replace_block(text, "tiny_k", grids.tiny_k_block(tiny, folder))
        text = replace_block(text, "tiny_seed0", grids.seed_block(tiny, folder))
        text = replace_block(text, "tiny_verdicts", grids.tiny_verdicts_block(tiny, folder))
        text = replace_block(text, "tiny_implicit", grids.implicit_block(grids.headline_records(tiny), folder))
        written += grids.tiny_figures(tiny, docs, "tiny_")
    beta1 = grids.load_run_records(repo / "results" / "tiny_grid_beta1")
    if beta1:
        folder = "results/tiny_grid_beta1/"
        text = replace_block(text, "beta1_table", grids.tiny_table_block(beta1, folder))
        text = replace_block(text, "beta1_verdicts", grids.tiny_verdicts_block(beta1, folder))
        text = replace_block(text, "beta1_implicit", grids.implicit_block(beta1, folder))
        written += grids.tiny_figures(beta1, docs, "tiny_beta1_", which=("likelihood_trends",))
    tiny_page.write_text(text)
    written += [tiny_page]

    alpha_beta = docs / "results_alpha_beta.md"
    text = alpha_beta.read_text()
    records = grids.load_alpha_beta(repo / "results" / "alpha_beta")
    text = replace_block(text, "alpha_beta_tables", grids.alpha_beta_tables_block(records))
    written += grids.alpha_beta_figures(records, docs)
    alpha_beta.write_text(replace_block(text, "alpha_beta_noise", grids.alpha_beta_block(records)))
    written += [alpha_beta]
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temporary copy of docs/ and fail if a generated page differs")
    parser.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args(argv)
    docs = args.repo / "docs"
    if not args.check:
        for path in build(args.repo, docs):
            print(f"wrote {path.relative_to(args.repo)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "docs"
        shutil.copytree(docs, copy)
        stale = [p.name for p in build(args.repo, copy) if p.suffix == ".md" and p.read_text() != (docs / p.name).read_text()]
    if stale:
        print(f"out of date (run `{COMMAND}`): {', '.join(stale)}")
        return 1
    print("every generated page matches its records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
