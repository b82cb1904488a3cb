r"""Live controls for the theory lectures (notebooks 01-03): sliders that redraw one figure.

Each ``draw_*`` function is plain matplotlib: it takes the slider values and returns a Figure, so it can be tested
and saved like every other figure of the kit. :func:`live` puts sliders above such a figure in a notebook:

* the default figure is drawn at once and displayed as a normal output (``display(fig, display_id=True)``), so a
  notebook run headless (papermill, nbval) holds the same figure a static cell would;
* the sliders are ``ipywidgets``; moving one redraws the figure in place (``DisplayHandle.update``), in JupyterLab or
  any front end with a live kernel. A redraw that fails shows its one-line error instead of the figure.

Every legend sits outside its axes (:func:`legend_outside`), so it covers no data whatever the slider values.

The figures:

* :func:`draw_optimum` (lecture 01): ``mu`` and ``pi* ∝ mu·exp(r/(alpha·beta))``, and the soft labels
  ``softmax(r/alpha)`` of K responses against the uniform ``1/K``.
* :func:`draw_losses` (lecture 02): the soft labels, and the three losses -- DPO on (best, worst), InfoNCA and NCA on
  the K responses -- as the policy moves the best response's implicit reward by ``delta``.
* :func:`draw_table10` (lecture 03): ``pi*`` for the toy's rewards, and the Table 10 comparison: DPO, pairwise NCA
  and the reward-data InfoNCA / NCA losses of the three scenarios.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from nca_kit import losses, toy
from nca_kit.plots import titled

__all__ = ["legend_outside", "draw_optimum", "draw_losses", "draw_table10", "draw_toy", "live", "sliders"]

FIGSIZE = (11, 3.8)


def legend_outside(ax, **kwargs):
    """Put ``ax``'s legend to the right of the axes (outside the data area) and return it."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", **kwargs)


def _bars(ax, categories, series: dict) -> None:
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, values, width=width, label=name)
    ax.set_xticks(positions, [str(c) for c in categories])


def _labels_panel(ax, rewards: np.ndarray, alpha: float) -> None:
    k = len(rewards)
    labels = losses.soft_labels(torch.tensor(rewards, dtype=torch.float64)[None, :], alpha)[0].numpy()  # (K,)
    _bars(ax, [f"{r:.2f}" for r in rewards], {"softmax(r/alpha)": labels})
    ax.axhline(1 / k, color="grey", linestyle="--", linewidth=1, label=f"uniform 1/K = {1 / k:.3f}")
    ax.set(xlabel="reward r of each of the K responses", ylabel="soft label", ylim=(0, 1.05),
           title=f"soft labels, K = {k}")
    legend_outside(ax)


def draw_optimum(world: toy.ToyWorld, alpha: float, k: int, beta: float = 1.0):
    """Lecture 01. Left: ``mu`` and ``pi* ∝ mu·exp(r/(alpha·beta))`` per response. Right: the soft labels of the
    first ``k`` responses of ``world`` (``2 <= k <= N``)."""
    if not 2 <= k <= world.n:
        raise ValueError(f"k must be in [2, {world.n}], got {k}")
    pi = world.optimal_policy(alpha, beta)
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    _bars(left, world.names, {"mu (reference)": world.mu, "pi*": pi})
    left.set(xlabel="response", ylabel="probability", ylim=(0, 1.05), title="reference and optimal policy")
    legend_outside(left)
    _labels_panel(right, world.rewards[:k], alpha)
    fig.suptitle(titled("pi* ∝ mu·exp(r/(alpha·beta)) and InfoNCA's soft labels", {"alpha": alpha, "beta": beta}))
    fig.tight_layout()
    return fig


def _loss_curves(rewards: np.ndarray, alpha: float, beta: float, deltas: np.ndarray) -> dict[str, np.ndarray]:
    """DPO (best vs worst), InfoNCA and NCA (all K) when the best response's log(pi/mu) moves by ``delta``."""
    k = len(rewards)
    best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
    policy = torch.zeros(len(deltas), k, dtype=torch.float64)  # (D, K) log pi - log mu
    policy[:, best] = torch.tensor(deltas, dtype=torch.float64)
    reference = torch.zeros_like(policy)
    scores = torch.tensor(rewards, dtype=torch.float64).expand(len(deltas), -1)  # (D, K)
    curves = {}
    dpo, _, _ = losses.preference_loss(policy[:, best], reference[:, best], policy[:, worst], reference[:, worst],
                                       beta=beta, loss_type="dpo")
    curves["DPO (best vs worst)"] = dpo.numpy()
    for name, loss_type in (("InfoNCA", "infonca"), ("NCA", "nca")):
        values, _ = losses.reward_loss(policy, reference, scores, alpha=alpha, beta=beta, loss_type=loss_type)
        curves[f"{name} (K = {k})"] = values.numpy()
    return curves


def draw_losses(rewards, alpha: float, beta: float, k: int | None = None):
    """Lecture 02. Left: soft labels of the first ``k`` rewards. Right: DPO, InfoNCA and NCA against ``delta``, the
    change of the best response's ``log(pi/mu)`` (every other response stays at ``mu``)."""
    rewards = np.asarray(rewards, dtype=float)
    k = len(rewards) if k is None else k
    if not 2 <= k <= len(rewards):
        raise ValueError(f"k must be in [2, {len(rewards)}], got {k}")
    rewards = rewards[:k]
    deltas = np.linspace(-6, 6, 121)
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    _labels_panel(left, rewards, alpha)
    for name, values in _loss_curves(rewards, alpha, beta, deltas).items():
        right.plot(deltas, values, label=name)
    right.axvline(0.0, color="grey", linestyle=":", linewidth=1, label="pi = mu")
    right.set(xlabel="delta = change of log(pi/mu) of the best response", ylabel="loss",
              title="the three losses")
    legend_outside(right)
    fig.suptitle(titled("Soft labels and the three losses", {"alpha": alpha, "beta": beta, "K": k}))
    fig.tight_layout()
    return fig


def draw_table10(alpha: float, beta: float, rewards=(10.0, 3.0, 7.0, 0.0)):
    """Lecture 03 with the toy's rewards ``(r_a, r_b, r_c, r_d)``. Left: ``mu`` and ``pi*``. Right: Table 10's
    losses (DPO, pairwise NCA, InfoNCA and NCA on reward data) of the three scenarios, each scenario's mean reward
    in its legend entry."""
    base = toy.paper_world()
    world = toy.ToyWorld(names=base.names, mu=base.mu, rewards=tuple(float(r) for r in rewards))
    table = toy.table10(world, beta=beta, alpha=alpha)
    columns = ["DPO loss", "NCA loss (pair)", "InfoNCA loss (rewards)", "NCA loss (rewards)"]
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    _bars(left, world.names, {"mu (reference)": world.mu, "pi*": world.optimal_policy(alpha, beta)})
    left.set(xlabel="response", ylabel="probability", ylim=(0, 1.05), title="reference and optimal policy")
    legend_outside(left)
    _bars(right, ["DPO", "NCA\n(pair)", "InfoNCA\n(rewards)", "NCA\n(rewards)"],
          {f"scenario {name}, E_pi[r] = {row['E_pi[r]']:.2f}": row[columns].to_numpy(dtype=float)
           for name, row in table.iterrows()})
    right.set(ylabel="loss", title="Table 10: the losses of the three policies")
    legend_outside(right)
    shown = {"alpha": alpha, "beta": beta, "r": "(" + ", ".join(f"{r:g}" for r in world.rewards) + ")"}
    fig.suptitle(titled("Which policy does each loss prefer?", shown))
    fig.tight_layout()
    return fig


def draw_toy(alpha: float, beta: float, r_a: float, r_b: float, r_c: float, r_d: float):
    """:func:`draw_table10` with one argument per reward (one slider each)."""
    return draw_table10(alpha, beta, rewards=(r_a, r_b, r_c, r_d))


# --------------------------------------------------------------------------------------------------------------------
# Controls
# --------------------------------------------------------------------------------------------------------------------


def sliders(**specs):
    """``name=(kind, value, low, high)`` -> ipywidgets sliders; ``kind`` is ``"log"`` (FloatLogSlider over
    ``[low, high]``), ``"float"`` or ``"int"``. A ``value`` outside ``[low, high]`` widens the range to include it."""
    import ipywidgets

    style = {"description_width": "initial"}
    made = {}
    for name, (kind, value, low, high) in specs.items():
        low, high = min(low, value), max(high, value)
        if kind == "log":
            made[name] = ipywidgets.FloatLogSlider(value=value, base=10, min=math.log10(low), max=math.log10(high),
                                                   step=0.05, description=name, continuous_update=False, style=style)
        elif kind == "float":
            made[name] = ipywidgets.FloatSlider(value=value, min=low, max=high, step=(high - low) / 100,
                                                description=name, continuous_update=False, style=style)
        elif kind == "int":
            made[name] = ipywidgets.IntSlider(value=value, min=low, max=high, description=name,
                                              continuous_update=False, style=style)
        else:
            raise ValueError(f"slider kind must be 'log', 'float' or 'int', got {kind!r}")
    return made


def live(draw, controls: dict, **fixed) -> dict:
    """Show ``controls`` (name -> ipywidgets value widget) above ``draw(**fixed, **values)``, redrawn on every change.

    The first figure is drawn and displayed at once as a normal output; returns ``controls`` (to set values from
    code, as the tests do).
    """
    import ipywidgets
    from IPython.display import DisplayHandle, display

    def current():
        return {name: control.value for name, control in controls.items()}

    fig = draw(**fixed, **current())
    display(ipywidgets.HBox(list(controls.values()), layout=ipywidgets.Layout(flex_flow="row wrap")))
    handle = display(fig, display_id=True) or DisplayHandle()  # None outside IPython: display only prints there
    plt.close(fig)

    def redraw(_change=None):
        try:
            figure = draw(**fixed, **current())
        except Exception as error:  # shown in place of the figure: a redraw has no cell to raise in
            handle.update(f"{type(error).__name__}: {error}")
            return
        handle.update(figure)
        plt.close(figure)

    for control in controls.values():
        control.observe(redraw, names="value")
    return controls
