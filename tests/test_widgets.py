"""The live controls of lectures 01-03 (``nca_kit.widgets``): every redraw function at the extreme slider values
draws finite data with its legends outside the axes, and ``live`` redraws the displayed figure on a change."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from nca_kit import toy, widgets  # noqa: E402

# The ends of the lectures' alpha and beta sliders, both low, both high, and crossed
EXTREMES = [(0.01, 0.01), (100.0, 10.0), (0.01, 10.0)]


def _check_readable(fig) -> None:
    """Every axes has finite data and a legend that lies entirely outside its data area."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None, f"{ax.get_title()!r} has no legend"
        box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.x0 >= area.x1 or box.y0 >= area.y1, f"the legend of {ax.get_title()!r} overlaps its axes"
        heights = [patch.get_height() for patch in ax.patches]
        ys = [y for line in ax.get_lines() for y in np.atleast_1d(line.get_ydata())]
        assert heights or ys, f"{ax.get_title()!r} shows no data"
        assert np.isfinite(heights).all() and np.isfinite(np.asarray(ys, dtype=float)).all()


@pytest.mark.parametrize("alpha, beta", EXTREMES)
@pytest.mark.parametrize("k", [2, 5])
def test_draw_optimum_at_extreme_sliders(alpha, beta, k):
    world = toy.make_world(5, 0, reward_scale=3.0)
    fig = widgets.draw_optimum(world, alpha, k, beta)
    _check_readable(fig)
    bars = fig.axes[0].patches
    assert abs(sum(b.get_height() for b in bars[world.n:]) - 1) < 1e-9, "pi* must be a distribution"
    assert len(fig.axes[1].patches) == k
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("alpha, beta", EXTREMES)
@pytest.mark.parametrize("k", [2, 5])
def test_draw_losses_at_extreme_sliders(alpha, beta, k):
    world = toy.make_world(5, 0, reward_scale=3.0)
    fig = widgets.draw_losses(world.rewards, alpha, beta, k)
    _check_readable(fig)
    curves = {line.get_label(): line.get_ydata() for line in fig.axes[1].get_lines()}
    assert {"DPO (best vs worst)", f"InfoNCA (K = {k})", f"NCA (K = {k})"} <= set(curves)
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("alpha, beta", EXTREMES)
@pytest.mark.parametrize("rewards", [(10.0, 3.0, 7.0, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 10.0, 0.0, 10.0)])
def test_draw_table10_at_extreme_sliders(alpha, beta, rewards):
    fig = widgets.draw_toy(alpha, beta, *rewards)
    _check_readable(fig)
    heights = np.array([b.get_height() for b in fig.axes[1].patches]).reshape(3, 4)  # scenario x loss
    assert np.ptp(heights[:, 0]) < 1e-9, "DPO must give the three scenarios one loss"
    matplotlib.pyplot.close(fig)


def test_draw_checks_k():
    world = toy.make_world(5, 0)
    with pytest.raises(ValueError, match="k must be in"):
        widgets.draw_optimum(world, 1.0, 6)


def test_live_displays_the_default_figure_and_redraws_on_change(monkeypatch):
    pytest.importorskip("ipywidgets")
    import IPython.display

    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    def fake_display(*objs, display_id=None, **kwargs):
        shown.extend(objs)
        return Handle() if display_id else None

    monkeypatch.setattr(IPython.display, "display", fake_display)
    calls = []

    def draw(alpha, k, world):
        calls.append((alpha, k))
        if k == 4:
            raise ValueError("k must be in [2, 3], got 4")
        return widgets.draw_optimum(world, alpha, k)

    world = toy.make_world(3, 0)
    controls = widgets.live(draw, widgets.sliders(alpha=("log", 1.0, 0.01, 100.0), k=("int", 2, 2, 4)), world=world)
    assert calls == [(1.0, 2)] and isinstance(shown[-1], matplotlib.figure.Figure), "the default figure is shown"
    controls["alpha"].value = 0.01
    controls["k"].value = 3
    assert calls[1:] == [(0.01, 2), (0.01, 3)] and all(isinstance(u, matplotlib.figure.Figure) for u in updates)
    controls["k"].value = 4
    assert updates[-1] == "ValueError: k must be in [2, 3], got 4", "a failed redraw shows its error in place"


def test_sliders_include_their_value():
    pytest.importorskip("ipywidgets")
    made = widgets.sliders(alpha=("log", 1000.0, 0.01, 100.0), k=("int", 3, 2, 8), r=("float", 7.0, 0.0, 10.0))
    assert made["alpha"].value == pytest.approx(1000.0) and made["k"].value == 3 and made["r"].value == 7.0
    with pytest.raises(ValueError, match="slider kind"):
        widgets.sliders(x=("slow", 1, 0, 2))
