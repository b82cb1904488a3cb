"""Tests of nca_kit.plots: settings under the title, integer ticks on step axes, and the number format."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from nca_kit import plots  # noqa: E402


def tick_labels(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_step_axes_get_integer_ticks():
    frame = pd.DataFrame({"a": [0.5, 0.6, 0.7], "b": [0.5, 0.4, 0.3]}, index=pd.Index([0, 1, 2], name="step"))
    fig = plots.plot_toy_probs({"run": frame}, ["a", "b"], title="t")
    assert all(float(t).is_integer() for t in tick_labels(fig.axes[0]))
    fig = plots.plot_lines(np.arange(3), {"loss": [1.0, 0.5, 0.2]}, title="t", xlabel="step", ylabel="loss")
    assert all(float(t).is_integer() for t in tick_labels(fig.axes[0]))
    records = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(3)]
    fig = plots.plot_training_trends(records)
    assert all(float(t).is_integer() for t in tick_labels(fig.axes[0]))
    plots.plt.close("all")


def test_fractional_axes_keep_fractional_ticks():
    fig = plots.plot_lines(np.linspace(0, 1, 5), {"y": np.arange(5.0)}, title="t", xlabel="x", ylabel="y")
    assert any(not float(t).is_integer() for t in tick_labels(fig.axes[0]))
    plots.plt.close("all")


def test_settings_are_named_under_the_title_and_optional():
    fig = plots.plot_bars(["a"], {"s": [1.0]}, title="Point", xlabel="x", ylabel="y",
                          settings={"K": 4, "beta": 0.1, "seed": 0})
    assert fig.axes[0].get_title() == "Point\nK = 4, beta = 0.1, seed = 0"
    fig = plots.plot_bars(["a"], {"s": [1.0]}, title="Point", xlabel="x", ylabel="y")
    assert fig.axes[0].get_title() == "Point"
    frame = pd.DataFrame({"a": [1.0, 1.0]}, index=[0, 1])
    fig = plots.plot_toy_probs({"run": frame}, ["a"], title="Point", settings={"alpha": 5.0})
    assert fig._suptitle.get_text() == "Point\nalpha = 5"
    plots.plt.close("all")


@pytest.mark.parametrize("x, digits, text", [(0.12345, 4, "0.1235"), (-1e-12, 4, "0.0000"), (-0.5, 2, "-0.50")])
def test_fmt_never_prints_negative_zero(x, digits, text):
    assert plots.fmt(x, digits) == text
