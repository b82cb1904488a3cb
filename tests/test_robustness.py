"""The α × β grid (nca_kit.robustness, nca_kit.grid, scripts/run_grid.py --alphas/--betas): plan, folders, tables,
heat maps, and resuming a half-finished grid without rerunning its finished cells. Runs are replaced by a fake that writes a
record of the real schema (a real run is a SmolLM2 training run; notebook 32 runs real ones)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nca_kit import grid, robustness
from nca_kit.experiment import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]


def fake_score(spec: ExperimentSpec) -> float:
    """A made-up held-out accuracy: NCA flat across the grid, InfoNCA falling with α, DPO with β; seed adds 0.01."""
    if spec.method == "nca":
        base = 0.30
    elif spec.method == "infonca":
        base = 0.30 - 0.1 * spec.alpha
    else:
        base = 0.30 - 0.1 * spec.beta
    return base + 0.01 * spec.seed


def fake_run(calls: list):
    def run(spec: ExperimentSpec, *, out, **_):  # the grid also passes reuse_model
        calls.append((spec.method, spec.alpha, spec.beta, spec.seed))
        acc = fake_score(spec)
        summary = {"n_prompts": 4, "greedy_accuracy": acc, "sample_reward": 10 * acc, "sample_accuracy": acc,
                   "kl": 0.0}
        record = {"run": spec.run_name, "method": spec.method, "loss_type": spec.loss_type, "k": spec.k_trained,
                  "alpha": spec.alpha, "beta": spec.beta, "lr": spec.lr, "steps": spec.steps, "batch": spec.batch,
                  "seed": spec.seed, "smoke": spec.smoke, "reward_source": spec.reward_source,
                  "train_rows": spec.steps * spec.batch, "train_seconds": 1.0, "final_loss": 0.5,
                  "base": {**summary, "greedy_accuracy": 0.25}, "trained": summary,
                  "trend": {"step": [1, 2], "chosen": [0.0, 0.1], "rejected": [0.0, -0.1]}, "spec": spec.to_dict()}
        folder = Path(out) / "tiny_runs" / spec.run_name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(record))
        return record
    return run


def test_plan_sweeps_alpha_methods_over_the_grid_and_dpo_over_beta_seed_by_seed():
    cells = robustness.plan([0.01, 1], [0.1, 1], [0, 1])
    assert len(cells) == 2 * (2 * 2 * 2 + 2)  # seeds x (alphas x betas x {infonca, nca} + betas x {dpo})
    assert cells[:5] == [("infonca", 0.01, 0.1, 0), ("nca", 0.01, 0.1, 0), ("infonca", 1, 0.1, 0),
                         ("nca", 1, 0.1, 0), ("dpo", None, 0.1, 0)]
    assert {c[3] for c in cells[:10]} == {0} and {c[3] for c in cells[10:]} == {1}
    with pytest.raises(ValueError, match="methods must be reward methods whose loss reads alpha"):
        robustness.plan([0.1], [0.1], [0], methods=("dpo",))
    with pytest.raises(ValueError, match="beta_methods must be methods without alpha"):
        robustness.plan([0.1], [0.1], [0], beta_methods=("nca",))
    with pytest.raises(ValueError, match="alphas must hold at least one value"):
        robustness.plan([], [0.1], [0])


def test_specs_and_folders_keep_cells_apart():
    specs = robustness.grid_specs(robustness.plan([0.01, 1], [0.1], [0]), ExperimentSpec(steps=5))
    assert [(s.method, s.alpha, s.beta, s.steps) for s in specs] == [
        ("infonca", 0.01, 0.1, 5), ("nca", 0.01, 0.1, 5), ("infonca", 1.0, 0.1, 5), ("nca", 1.0, 0.1, 5),
        ("dpo", 0.01, 0.1, 5)]
    dirs = [robustness.cell_dir("out", s).as_posix() for s in specs]
    assert dirs == ["out/alpha0.01_beta0.1"] * 2 + ["out/alpha1_beta0.1"] * 2 + ["out/beta0.1"]
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0.0"):
        robustness.grid_specs([("nca", 0.1, 0, 0)], ExperimentSpec())


def test_tables_summary_and_heatmap_from_records(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(robustness, "run_experiment", fake_run(calls))
    specs = robustness.grid_specs(robustness.plan([0.01, 1], [0.1, 1], [0, 1]), ExperimentSpec())
    records = robustness.run_grid(specs, tmp_path, progress=False)
    assert len(calls) == len(specs) == 20

    table = robustness.grid_table(records, "greedy_accuracy")
    assert table["infonca"]["alphas"] == [0.01, 1.0] and table["infonca"]["betas"] == [0.1, 1.0]
    # seed mean of 0.30 - 0.1 alpha + {0, 0.01}: rows are beta, columns alpha
    np.testing.assert_allclose(table["infonca"]["mean"], [[0.304, 0.205], [0.304, 0.205]])
    assert (table["infonca"]["seeds"] == 2).all()
    assert table["dpo"]["alphas"] == [None] and table["dpo"]["mean"].shape == (2, 1)

    summary = robustness.robustness_summary(records, "greedy_accuracy")
    assert summary["nca"]["range"] == pytest.approx(0.0)
    assert summary["infonca"]["range"] == pytest.approx(0.099)
    assert summary["dpo"]["range"] == pytest.approx(0.09)
    assert summary["seed_noise"] == pytest.approx(0.01)
    text = robustness.summary_markdown(records, ("greedy_accuracy",))
    assert "| greedy_accuracy | infonca | 4 | 0.2545 | 0.2050 | 0.3040 | 0.0990 | 0.0100 |" in text
    cells = robustness.grid_markdown(records, "greedy_accuracy").splitlines()
    assert cells[0] == "| greedy_accuracy: method | β | α = 0.01 | α = 1 | no α |"
    assert "| infonca | 0.1 | 0.3040 (2) | 0.2050 (2) |  |" in cells and "| dpo | 1 |  |  | 0.2050 (2) |" in cells
    fig = robustness.plot_grid(records, "greedy_accuracy", path=tmp_path / "heat.png")
    assert len(fig.axes) == 4 and (tmp_path / "heat.png").stat().st_size > 1000  # three panels + colour bar


def test_run_grid_reads_finished_cells_back_instead_of_rerunning(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(robustness, "run_experiment", fake_run(calls))
    specs = robustness.grid_specs(robustness.plan([0.01, 1], [0.1], [0]), ExperimentSpec())
    robustness.run_grid(specs[:2], tmp_path, progress=False)
    records = robustness.run_grid(specs, tmp_path, progress=False)
    assert len(calls) == 5 and len(records) == 5
    assert [r["run"] for r in records] == [s.run_name for s in specs]
    other = robustness.grid_specs(robustness.plan([0.01], [0.1], [0]), ExperimentSpec(steps=7))
    with pytest.raises(ValueError, match=r"was run with other settings \(steps\)"):
        robustness.run_grid(other, tmp_path, progress=False)


@pytest.mark.slow
def test_run_grid_trains_cells_in_two_processes(tmp_path):
    """Real tiny runs, two at a time: every record comes back in the order of the specs, with its own folder."""
    base = ExperimentSpec(model="tiny-llama", data_model="smollm2-135m-instruct", steps=2, batch=2, lr=1e-3, n_eval=4)
    specs = robustness.grid_specs(robustness.plan([0.01, 1.0], [0.1], [0], methods=["nca"], beta_methods=["dpo"]),
                                  base)
    records = robustness.run_grid(specs, tmp_path, progress=False, workers=2)
    assert [(r["method"], r["alpha"], r["beta"]) for r in records] == [(s.method, s.alpha, s.beta) for s in specs]
    assert all(robustness.results_path(tmp_path, s).exists() for s in specs)
    assert all(len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"]) for r in records)
    assert robustness.run_grid(specs, tmp_path, progress=False, workers=2) == records  # read back, nothing rerun
    with pytest.raises(ValueError, match="workers"):
        robustness.run_grid(specs, tmp_path, workers=0)


def test_grid_resumes_a_half_finished_alpha_beta_grid(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(grid, "run_experiment", fake_run(calls))
    params = {"STEPS": 4}
    specs = grid.alpha_beta_specs([0.01, 0.1, 1], [0.01, 0.1, 1], [0, 1], ["dpo", "infonca", "nca"], params)
    assert len(specs) == 42 and all(s.steps == 4 for s in specs)
    for spec in specs[:17]:  # a grid stopped part-way through seed 0
        fake_run([])(spec, out=robustness.cell_dir(tmp_path, spec))
    assert grid.run_all(specs, tmp_path, params, alpha_beta=True) == []
    grid.collect_alpha_beta(tmp_path, docs=None)
    assert len(calls) == 42 - 17, "finished cells must not run again"
    assert calls[0] == (specs[17].method, specs[17].alpha, specs[17].beta, specs[17].seed)
    assert capsys.readouterr().out.count("[skip]") == 17
    assert len(robustness.load_grid_records(tmp_path)) == 42
    for name in ("alpha_beta.csv", "alpha_beta_table.md", "alpha_beta_sample_reward.png",
                 "alpha_beta_greedy_accuracy.png"):
        assert (tmp_path / name).exists(), name
    calls.clear()
    assert grid.run_all(specs, tmp_path, params, alpha_beta=True) == [] and calls == []  # a finished grid: no run
    table = (tmp_path / "alpha_beta_table.md").read_text()
    assert "| greedy_accuracy | nca | 9 | 0.3050 | 0.3050 | 0.3050 | 0.0000 | 0.0100 |" in table


def test_script_needs_both_axes(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "run_grid.py"), "--out", str(tmp_path),
                             "--alphas", "0.1"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "the alpha x beta grid needs both --alphas and --betas" in result.stderr


def test_seed_noise_needs_two_seeds_of_a_cell():
    assert math.isnan(robustness.seed_noise([], "greedy_accuracy"))
