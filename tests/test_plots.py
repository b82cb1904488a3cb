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


def _heatmap(values):
    panel = (np.asarray(values), ["0.01", "0.1"], ["0.1"], None)
    return plots.plot_heatmaps({"nca": panel}, title="t", xlabel="α", ylabel="β", colorbar="gain",
                               vmin=float(np.min(values)), vmax=float(np.max(values)))


def test_heatmap_does_not_colour_differences_the_printed_numbers_do_not_show():
    flat = _heatmap([[2e-5, -3e-5]])  # both print as 0.000
    (ax,) = flat.axes  # no colour-bar axes
    rgba = ax.images[0].to_rgba(ax.images[0].get_array())
    assert np.allclose(rgba[0, 0], rgba[0, 1]), "one neutral colour"
    assert "no colour scale" in flat._suptitle.get_text()
    varied = _heatmap([[0.1, 0.3]])
    assert len(varied.axes) == 2, "a colour bar where the numbers differ"
    image = varied.axes[0].images[0]
    rgba = image.to_rgba(image.get_array())
    assert not np.allclose(rgba[0, 0], rgba[0, 1])


def test_embedding_study_panels_name_their_axes_and_error_bars():
    from nca_kit.plots import plot_study

    df = pd.DataFrame([{"head": h, "noise": n, "seed": s, "accuracy": 0.6 + 0.01 * s, "bon_picked": 5.0,
                        "bon_oracle": 8.0, "bon_random": 4.0} for h in ("bt_mlp", "clf_mlp") for n in (0.0, 0.2)
                       for s in (0, 1, 2)])
    fig = plot_study(df, title="study", metrics=("accuracy", "bon_picked"))
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert "3 seeds" in fig._suptitle.get_text() and "1 std" in fig._suptitle.get_text()
    assert "chance (0.5)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
