"""Figures for the course and the training runs. Every function returns the matplotlib Figure and saves it as PNG
when given a path; titles state the point, axes are labelled, legends name every line.

Every plotting function takes ``settings``: the run's settings that a reader needs to read the figure (e.g.
``{"K": 4, "beta": 0.1, "seed": 0}``), printed under the title. Axes whose values are all integers (steps, K)
get integer ticks. :func:`fmt` prints the numbers the notebooks show.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.ticker import MaxNLocator


def fmt(x: float, digits: int = 4) -> str:
    """Fixed-point text of ``x`` with ``digits`` decimals; a value that rounds to zero prints as ``0.0000``, never
    ``-0.0000`` (round-off decides the sign of a vanishing number, and printed outputs must not depend on it)."""
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def titled(title: str, settings: dict | None = None) -> str:
    """``title`` with a second line naming ``settings``, e.g. ``"K = 4, beta = 0.1, seed = 0"`` (floats as ``:g``)."""
    if not settings:
        return title
    shown = ", ".join(f"{name} = {value:g}" if isinstance(value, float) else f"{name} = {value}"
                      for name, value in settings.items())
    return f"{title}\n{shown}"


def _is_integral(values) -> bool:
    values = np.asarray(values, dtype=float).ravel()
    return values.size > 0 and bool(np.all(np.isfinite(values) & (values == np.round(values))))


def integer_ticks(ax, *xs) -> None:
    """Integer-only x ticks on ``ax`` when every value in ``xs`` is an integer (steps, K): no ``0.5`` step labels."""
    if all(x is not None and _is_integral(x) for x in xs) and xs:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(fig, path=None, dpi: int = 120):
    """Save ``fig`` as PNG at ``path`` (parent folders created) and return it; ``path=None`` only returns it."""
    if path is not None:
        from pathlib import Path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


__all__ = ["plt", "save", "fmt", "titled", "integer_ticks"]


def plot_agreement(predicted, observed, *, title: str, weights=None, xlabel: str = "predicted probability",
                   ylabel: str = "empirical frequency", label: str = "observed", settings: dict | None = None,
                   path=None):
    """Scatter of ``observed`` against ``predicted`` with the diagonal ``y = x``; marker area ∝ ``weights``."""
    predicted, observed = np.asarray(predicted, float).ravel(), np.asarray(observed, float).ravel()
    sizes = None
    if weights is not None:
        weights = np.asarray(weights, float).ravel()
        sizes = 8 + 72 * weights / weights.max()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="y = x (theory)")
    ax.scatter(predicted, observed, s=sizes, alpha=0.6, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xlabel, ylabel=ylabel, title=titled(title, settings))
    ax.legend(loc="upper left")
    return save(fig, path)


def plot_lines(x, series: dict, *, title: str, xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
               marker="o", vline=None, hline=None, xticks=None, settings: dict | None = None, path=None):
    """One line per ``series`` item (label -> y values over ``x``, or label -> (x, y)); optional reference lines.

    ``marker`` is one matplotlib marker for every line or a dict label -> marker (``""``: none; ``" "``: no line,
    markers only is written ``{"label": "o "}``). ``vline``/``hline`` are ``(value, label)`` pairs drawn dashed and
    named in the legend. ``xticks``: tick positions to label with their plain values (useful on a log axis).
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    all_xs = []
    for name, values in series.items():
        xs, ys = values if isinstance(values, tuple) else (x, values)
        all_xs.append(xs)
        style = marker.get(name, "o") if isinstance(marker, dict) else marker
        line = "none" if style.endswith(" ") else "-"
        ax.plot(xs, ys, marker=style.strip() or None, markersize=4, linestyle=line, label=name)
    if vline is not None:
        ax.axvline(vline[0], color="grey", linestyle="--", linewidth=1, label=vline[1])
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", linewidth=1, label=hline[1])
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
        ax.minorticks_off()
    elif not logx:
        integer_ticks(ax, *all_xs)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=titled(title, settings))
    ax.legend()
    return save(fig, path)


def plot_bars(categories, series: dict, *, title: str, xlabel: str, ylabel: str, settings: dict | None = None,
              path=None):
    """Grouped bars: one group per category, one bar per ``series`` item (label -> values)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, values, width=width, label=name)
    ax.set_xticks(positions, [str(c) for c in categories])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=titled(title, settings))
    ax.legend()
    return save(fig, path)


__all__ += ["plot_agreement", "plot_lines", "plot_bars"]


def plot_toy_probs(runs: dict, responses, *, title: str, reference=None, target=None, logy: bool = False,
                   ylabel: str = "probability pi(y)", settings: dict | None = None, path=None):
    """One panel per run (name -> DataFrame indexed by step with one probability column per response).

    ``reference`` (e.g. ``mu``) and ``target`` (e.g. ``pi*``) are optional per-response values drawn as dotted and
    dashed horizontal lines in each response's colour. Panels share the y axis so runs compare at a glance.
    """
    responses = list(responses)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, frame) in zip(axes[0], runs.items()):
        for i, response in enumerate(responses):
            color = colors[i % len(colors)]
            ax.plot(frame.index, frame[response], color=color, label=response)
            if reference is not None:
                ax.axhline(reference[i], color=color, linestyle=":", linewidth=1)
            if target is not None:
                ax.axhline(target[i], color=color, linestyle="--", linewidth=1)
        if logy:
            ax.set_yscale("log")
        integer_ticks(ax, frame.index)
        ax.set(title=name, xlabel="gradient step")
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if reference is not None:
        handles.append(plt.Line2D([], [], color="grey", linestyle=":"))
        labels.append("reference mu")
    if target is not None:
        handles.append(plt.Line2D([], [], color="grey", linestyle="--"))
        labels.append("target pi*")
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(titled(title, settings))
    fig.tight_layout()
    return save(fig, path)


__all__ += ["plot_toy_probs"]


def plot_training_trends(records, *, title: str = "training trends", settings: dict | None = None, path=None):
    """Three panels over optimizer steps from ``metrics.jsonl`` records (dicts with ``step`` and ``loss``):

    the loss; the change of log-likelihood of the best and worst response since step 0 (``logps/chosen_delta``,
    ``logps/rejected_delta``, the likelihood trend of the paper's Fig. 2); and the implicit rewards by data-reward
    rank (``rewards/A0`` = best). Metrics missing from the records are left out.
    """
    rows = [r for r in records if "loss" in r]
    steps = [r["step"] for r in rows]

    def series(key):
        return [r.get(key, float("nan")) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, series("loss"), marker="o", markersize=3, label="loss")
    axes[0].set(xlabel="optimizer step", ylabel="loss", title="loss per step")
    axes[1].axhline(0.0, color="grey", linestyle="--", linewidth=1, label="step 0 (reference)")
    for key, name in (("logps/chosen_delta", "best response"), ("logps/rejected_delta", "worst response")):
        if any(key in r for r in rows):
            axes[1].plot(steps, series(key), marker="o", markersize=3, label=name)
    axes[1].set(xlabel="optimizer step", ylabel="log π(y|x) − log μ(y|x)  [nats]",
                title="change of log-likelihood since step 0")
    ranks = sorted({k for r in rows for k in r if k.startswith("rewards/A")}, key=lambda k: int(k[len("rewards/A"):]))
    for key in ranks:
        axes[2].plot(steps, series(key), marker="o", markersize=3, label=f"{key[len('rewards/'):]} (rank by reward)")
    axes[2].set(xlabel="optimizer step", ylabel="β log(π/μ)", title="implicit reward by data-reward rank")
    for ax in axes:
        integer_ticks(ax, steps)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(titled(title, settings))
    fig.tight_layout()
    return save(fig, path)


__all__ += ["plot_training_trends"]


def plot_reward_histogram(rewards, *, title: str, threshold: float | None = None, settings: dict | None = None,
                          path=None):
    """Bar chart of how many responses got each reward value (``rewards``: a flat list or a list of per-prompt lists);
    ``threshold`` draws a dashed line at the correctness cut of the rubric."""
    from collections import Counter

    flat = [float(x) for r in rewards for x in (r if isinstance(r, (list, tuple)) else [r])]
    counts = Counter(flat)
    values = sorted(counts)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(values, [counts[v] for v in values], width=0.8, label="responses")
    if threshold is not None:
        ax.axvline(threshold - 0.5, color="grey", linestyle="--", linewidth=1, label=f"correct (reward ≥ {threshold:g})")
    ax.set(xlabel="rubric reward (0–10)", ylabel="number of responses", title=titled(title, settings))
    ax.legend()
    return save(fig, path)


def plot_band_lines(series: dict, *, title: str, xlabel: str, ylabel: str, hline=None, xticks=None,
                    settings: dict | None = None, path=None):
    """Mean lines with a shaded spread: ``series`` maps a label to ``(x, mean, low, high)`` (e.g. min/max over seeds).

    ``hline`` is an optional ``(value, label)`` reference line (e.g. ``(0, "reference")``); ``xticks`` optional tick
    positions (e.g. the K values of an ablation).
    """
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    for name, (xs, mean, low, high) in series.items():
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=name)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if xticks is not None:
        ax.set_xticks(list(xticks))
    else:
        integer_ticks(ax, *(xs for xs, *_ in series.values()))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=titled(title, settings))
    ax.legend()
    return save(fig, path)


def plot_error_bars(categories, series: dict, *, title: str, xlabel: str, ylabel: str, settings: dict | None = None,
                    path=None):
    """Grouped bars with error bars: ``series`` maps a label to ``(means, errors)`` over ``categories``; an error is a
    half-width (one number) or a ``(below, above)`` pair, e.g. the distance to the min and max over seeds."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(categories) + 2), 4))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(categories))
    for i, (name, (means, errors)) in enumerate(series.items()):
        errors = np.asarray(errors, float)
        yerr = errors.T if errors.ndim == 2 else errors
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, means, width=width, yerr=yerr, capsize=3, label=name)
    ax.set_xticks(positions, [str(c) for c in categories], rotation=20, ha="right")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=titled(title, settings))
    ax.legend()
    return save(fig, path)


__all__ += ["plot_reward_histogram", "plot_band_lines", "plot_error_bars"]


def plot_gain_vs_quality(points: dict, *, title: str, xlabel: str, ylabels, settings: dict | None = None,
                         path=None):
    """Policy gain against reward quality, one panel per gain metric, one marker style per method.

    ``points`` maps a method to a list of ``(label, x, x_err, ys)``: ``label`` names the point (the reward source),
    ``x`` its reward quality, ``ys`` one ``(mean, (below, above))`` per panel (e.g. min/max over seeds);
    ``x_err`` a ``(below, above)`` pair too. ``ylabels``: one label per panel. A dashed line marks no gain.
    """
    fig, axes = plt.subplots(1, len(ylabels), figsize=(5.2 * len(ylabels), 4.2), squeeze=False)
    markers = "osD^vP*X"
    for panel, (ax, ylabel) in enumerate(zip(axes[0], ylabels)):
        ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        for i, (method, pts) in enumerate(points.items()):
            xs = [p[1] for p in pts]
            ys = [p[3][panel][0] for p in pts]
            xerr = np.array([p[2] for p in pts], float).T
            yerr = np.array([p[3][panel][1] for p in pts], float).T
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=markers[i % len(markers)], capsize=3, label=method,
                        alpha=0.85)
            if i == 0:
                for label, x, _, y in pts:
                    ax.annotate(label, (x, y[panel][0]), textcoords="offset points", xytext=(4, 6), fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel)
    axes[0][0].legend()
    fig.suptitle(titled(title, settings))
    fig.tight_layout()
    return save(fig, path)


__all__ += ["plot_gain_vs_quality"]


def plot_source_vs_rubric(golden, scores, *, title: str, source: str, settings: dict | None = None, path=None):
    """Each answer's reward from a source against its rubric reward, both as rows of K per prompt.

    The source's rewards are centred per prompt (its mean over the prompt's K answers subtracted): NCA, InfoNCA and
    the pair pruning only ever compare answers to the same prompt. Points are jittered sideways; a black bar marks
    the mean at each rubric value. A good source climbs from left to right.
    """
    rubric = np.array([r for row in golden for r in row], float)
    centred = np.array([r - np.mean(row) for row in scores for r in row], float)
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(rubric + rng.uniform(-0.25, 0.25, len(rubric)), centred, s=10, alpha=0.4, label="one answer")
    values = np.unique(rubric)
    means = [centred[rubric == v].mean() for v in values]
    ax.scatter(values, means, marker="_", s=600, color="black", linewidths=2, label="mean")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="rubric reward (golden, 0-10)", ylabel=f"{source} reward − its prompt mean",
           title=titled(title, settings))
    ax.legend()
    return save(fig, path)


__all__ += ["plot_source_vs_rubric"]


def plot_heatmaps(panels: dict, *, title: str, xlabel: str, ylabel: str, colorbar: str, vmin=None, vmax=None,
                  settings: dict | None = None, path=None):
    """Annotated heat maps side by side on one colour scale: ``panels`` maps a label to ``(values, xticklabels,
    yticklabels, counts)``, ``values`` a ``(rows, columns)`` array (NaN: no value, left blank) and ``counts`` an
    optional array of the same shape printed under each value in brackets (e.g. seeds averaged)."""
    widths = [max(np.asarray(v).shape[1], 1) for v, *_ in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * sum(widths) + 2.5, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    # Colour only differences the printed numbers show: cells equal at 3 decimals share one neutral colour and the
    # figure has no colour scale (a scale stretched over float noise would invent differences).
    shown = np.concatenate([np.round(np.asarray(v, float), 3).ravel() for v, *_ in panels.values()])
    shown = shown[np.isfinite(shown)]
    flat = shown.size == 0 or shown.min() == shown.max()
    image = None
    for ax, (name, (values, xticks, yticks, counts)) in zip(axes[0], panels.items()):
        values = np.asarray(values, float)
        if flat:
            ax.imshow(np.where(np.isfinite(values), 0.0, np.nan), cmap=ListedColormap(["#e6e6e6"]), vmin=0, vmax=1,
                      origin="lower", aspect="auto")
        else:
            image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                text = fmt(v, 3) + (f"\n({int(counts[i][j])})" if counts is not None else "")
                dark = not flat and (vmax is None or v < (vmin + vmax) / 2)
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(values.shape[1]), xticks)
        ax.set_yticks(range(values.shape[0]), yticks)
        ax.set(title=name, xlabel=xlabel)
    axes[0][0].set_ylabel(ylabel)
    if flat:
        title = f"{title}\n(every cell is {fmt(shown[0], 3) if shown.size else 'empty'} to 3 decimals: no colour scale)"
    else:
        fig.colorbar(image, ax=list(axes[0]), label=colorbar)
    fig.suptitle(titled(title, settings))
    return save(fig, path)


__all__ += ["plot_heatmaps"]


# --------------------------------------------------------------------------------------------------------------------
# Reward-source studies (nca_kit.rewards.studies)
# --------------------------------------------------------------------------------------------------------------------

_METRIC_AXES = {
    "accuracy": "pairwise accuracy (0.5 = chance)",
    "spearman": "Spearman ρ with the golden reward",
    "spearman_per_prompt": "Spearman ρ per prompt",
    "order_consistency": "order consistency",
    "bon_picked": "golden reward of the pick",
    "bon_gain": "Best-of-N gain over a random pick",
}


def plot_study(df, *, title: str, metrics: Sequence[str] = ("accuracy", "spearman", "bon_picked"),
               xlabel: str = "label-flip rate", path=None):
    """One panel per metric against the noise level, a line per head, error bars one std over seeds (none with one
    seed; the figure says which). The Best-of-N panel also shows the random and the oracle pick, the accuracy panel
    chance (0.5)."""
    from nca_kit.rewards.metrics import METRIC_NAMES

    n_seeds = int(df.groupby(["head", "noise"]).size().max()) if len(df) else 0
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for head, part in df.groupby("head", sort=False):
            stats = part.groupby("noise")[metric].agg(["mean", "std"])
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3,
                        label=head)
        if metric == "bon_picked":
            ax.axhline(df["bon_oracle"].mean(), color="black", linestyle="--", linewidth=1, label="oracle pick")
            ax.axhline(df["bon_random"].mean(), color="grey", linestyle=":", linewidth=1, label="random pick")
        if metric == "accuracy":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance (0.5)")
        ax.set(title=METRIC_NAMES.get(metric, metric), xlabel=xlabel, ylabel=_METRIC_AXES.get(metric, metric))
        ax.legend(fontsize=7)
    bars = (f"mean over {n_seeds} seeds, error bars ± 1 std over seeds" if n_seeds > 1
            else "one seed: no error bars")
    fig.suptitle(f"{title}\n({bars}; held-out prompts)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def plot_pair_accuracy(table, ax=None, title: str = "Pairwise accuracy"):
    """Bars of accuracy (with 95 % intervals) by category, one colour per FLR variant, Direct as a dashed line with its
    interval as a grey band, chance as a grey line; every mark is in the legend (``table``:
    :meth:`nca_kit.rewards.studies.PairEvaluation.table`)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.8))
    flr_rows = table[table.scorer.str.startswith("FLR")]
    categories = list(dict.fromkeys(flr_rows.category))
    variants = list(dict.fromkeys(flr_rows.scorer))
    width = 0.8 / len(variants)
    x = np.arange(len(categories))
    for i, variant in enumerate(variants):
        rows = flr_rows[flr_rows.scorer == variant].set_index("category").loc[categories]
        err = np.vstack([rows.accuracy - rows.low, rows.high - rows.accuracy])
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, rows.accuracy, width, yerr=err, capsize=2, label=variant)
    direct = table[table.scorer == "Direct"].iloc[0]
    ax.axhline(direct.accuracy, color="k", ls="--", lw=1, label=f"Direct ({direct.accuracy:.3f})")
    ax.axhspan(direct.low, direct.high, color="k", alpha=0.08, label="Direct's 95 % interval")
    ax.axhline(0.5, color="grey", lw=0.8, label="chance (0.5)")
    ax.set_xticks(x, [c.replace("_", "\n") for c in categories], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (n = {int(direct.n)} pairs, 95 % Wilson intervals)")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def plot_score_distributions(evaluation, variant: str = "paper", axes=None):
    """Histograms of chosen vs rejected rewards of a :class:`nca_kit.rewards.studies.PairEvaluation`: FLR
    (``variant``, all categories) and Direct, and their margins (:func:`plot_reward_histograms`)."""
    return plot_reward_histograms(evaluation.flr.rewards(variant), evaluation.direct, variant, axes)


def plot_reward_histograms(flr, direct, variant: str = "paper", axes=None):
    """Histograms of chosen vs rejected rewards, FLR (``variant``) and Direct, and their standardised margins.
    ``flr``, ``direct``: one reward per response of each pair, chosen at even positions, rejected at odd ones."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    series = [(f"FLR ({variant})", np.asarray(flr, dtype=float)), ("Direct", np.asarray(direct, dtype=float))]
    for ax, (name, r) in zip(axes, series):
        bins = np.histogram_bin_edges(r, bins=30)
        ax.hist(r[0::2], bins=bins, alpha=0.6, label="chosen")
        ax.hist(r[1::2], bins=bins, alpha=0.6, label="rejected")
        ax.set_title(f"{name} reward")
        ax.set_xlabel("reward")
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
    for name, r in series:
        margin = r[0::2] - r[1::2]
        axes[2].hist(margin / (np.std(margin) or 1.0), bins=30, alpha=0.5, label=name)
    axes[2].axvline(0, color="k", lw=0.8)
    axes[2].set_title("chosen - rejected (standardised)")
    axes[2].set_xlabel("margin / its standard deviation")
    axes[2].set_ylabel("pairs")
    axes[2].legend(fontsize=8)
    return axes


def plot_k_response_scorers(table, n_prompts: int, axes=None):
    """Two panels for scorers of K-response answers against a rubric (``table``:
    :func:`nca_kit.rewards.studies.evaluate_k_responses`): accuracy on correct-vs-wrong pairs with 95 % Wilson
    intervals, and the rubric reward of each scorer's Best-of-K pick against a random and the oracle pick."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    labels = [f"{s}\n{c}" if c not in ("-", "all") else s for s, c in zip(table.scorer, table.category)]
    axes[0].bar(labels, table.correct_pair_accuracy,
                yerr=[table.correct_pair_accuracy - table.correct_pair_low,
                      table.correct_pair_high - table.correct_pair_accuracy], capsize=2, label="95 % Wilson interval")
    axes[0].axhline(0.5, color="grey", lw=0.8, label="chance (0.5)")
    axes[0].set_title(f"correct vs wrong pairs (n = {int(table.n_correct_pairs.iloc[0])})")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    axes[1].bar(labels, table.best_of_k)
    axes[1].axhline(table.random.iloc[0], color="k", ls="--", lw=1, label="random pick")
    axes[1].axhline(table.oracle.iloc[0], color="g", ls=":", lw=1, label="oracle")
    axes[1].set_title(f"Best-of-K rubric reward ({n_prompts} prompts)")
    axes[1].set_ylabel("rubric reward (0-10)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    return axes


__all__ += ["plot_study", "plot_pair_accuracy", "plot_score_distributions", "plot_reward_histograms",
            "plot_k_response_scorers"]
