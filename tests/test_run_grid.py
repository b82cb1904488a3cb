"""nca_kit.grid (behind scripts/run_grid.py): run order, parameter parsing, and the collection of finished runs into
CSV, table, figures.

Runs are not executed here (each is a notebook with a real model); the collection step reads the ``results.json``
files a run writes, so synthetic ones with the same schema exercise it fully.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nca_kit import grid


def fake_record(method: str, k: int, seed: int, *, acc: float, chosen: list[float]) -> dict:
    summary = lambda a: {"n_prompts": 100, "greedy_accuracy": a, "sample_reward": 10 * a, "sample_accuracy": a,  # noqa: E731
                         "kl": 0.0 if a == 0.25 else 0.1}
    steps = list(range(1, len(chosen) + 1))
    return {"run": f"{method}_k{k}_s{seed}", "method": method, "loss_type": method, "k": k, "alpha": 0.01,
            "beta": 0.1, "lr": 2e-4, "steps": len(chosen), "batch": 4, "seed": seed, "smoke": False,
            "train_rows": 4 * len(chosen), "train_seconds": 1.0, "base": summary(0.25), "trained": summary(acc),
            "trend": {"step": steps, "chosen": chosen, "rejected": [c - 1.0 for c in chosen]}, "final_loss": 0.5}


def write_runs(out: Path, records: list[dict]) -> None:
    for r in records:
        folder = out / "tiny_runs" / r["run"]
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(r))


def test_plan_runs_every_method_of_a_seed_before_the_next_seed():
    runs = grid.plan_methods(["dpo", "infonca", "nca"], [0, 1], [2, 3])
    assert runs[:3] == [("dpo", 4, 0), ("infonca", 4, 0), ("nca", 4, 0)]
    assert runs[3:6] == [("dpo", 4, 1), ("infonca", 4, 1), ("nca", 4, 1)]
    assert set(runs[6:]) == {(m, k, s) for m in ("infonca", "nca") for k in (2, 3) for s in (0, 1)}
    # the K ablation always covers both reward methods, and K = 4 is not run twice
    assert grid.plan_methods(["nca"], [0], [2, 4]) == [("nca", 4, 0), ("infonca", 2, 0), ("nca", 2, 0)]


def test_parse_value_reads_python_literals_and_keeps_text():
    assert grid.parse_value("0.5") == 0.5 and grid.parse_value("True") is True and grid.parse_value("12") == 12
    assert grid.parse_value("cuda") == "cuda"


def test_collect_writes_csv_table_and_figures_with_mean_and_range(tmp_path):
    records = [fake_record("dpo", 4, s, acc=a, chosen=[0.0, -0.5, -1.0, -1.5]) for s, a in ((0, 0.3), (1, 0.5))]
    records += [fake_record("nca", k, 0, acc=0.4, chosen=[0.0, 0.1, 0.2, 0.3]) for k in (2, 4)]
    write_runs(tmp_path, records)
    grid.collect(tmp_path, docs=tmp_path / "docs")

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["run"] for r in rows} == {"dpo_k4_s0", "dpo_k4_s1", "nca_k2_s0", "nca_k4_s0"}
    dpo0 = next(r for r in rows if r["run"] == "dpo_k4_s0")
    assert float(dpo0["greedy_accuracy"]) == 0.3 and float(dpo0["base_greedy_accuracy"]) == 0.25
    assert float(dpo0["chosen_delta_final"]) == -1.5
    assert float(dpo0["chosen_delta_late"]) == pytest.approx(-1.25)  # mean of the second half of the steps

    table = (tmp_path / "results_table.md").read_text()
    assert "| base model | – | – | 0.2500 |" in table
    assert "| dpo | 4 | 2 | 0.4000 [0.3000, 0.5000] |" in table  # mean [min, max] over the two seeds
    assert "| nca | 2 | 1 | 0.4000 |" in table
    for name in ("results.png", "likelihood_trends.png", "k_ablation.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert (tmp_path / "docs" / f"tiny_{name}").exists()


def test_k_ablation_compares_only_seeds_run_at_every_k():
    records = [fake_record("nca", 4, s, acc=0.3, chosen=[0.0]) for s in (0, 1, 2)]
    records += [fake_record("nca", 2, 0, acc=0.3, chosen=[0.0])]
    records += [fake_record("infonca", k, 0, acc=0.3, chosen=[0.0]) for k in (2, 4)]
    rows = [grid.flat_row(r) for r in records]
    for row, reward in zip(rows, (1.0, 5.0, 9.0, 2.0, 3.0, 4.0)):
        row["sample_reward"] = reward
    series, common = grid.k_ablation_series(grid.group(rows))
    assert common == {0}
    assert series["nca"] == ([2, 4], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0])  # seed 0 only, not the mean 5.0 of 3 seeds
    assert series["infonca"][:2] == ([2, 4], [3.0, 4.0])
    assert grid.k_ablation_series(grid.group(rows[:3])) == ({}, set())  # one K: no curve


def test_collect_without_runs_says_so(tmp_path, capsys):
    grid.collect(tmp_path, docs=None)
    assert "no results.json" in capsys.readouterr().out
    assert not (tmp_path / "results.csv").exists()


def test_grid_specs_take_notebook_parameter_names_and_fail_before_any_run():
    runs = grid.plan_methods(["dpo", "nca"], [0], [])
    specs = grid.specs(runs, {"STEPS": 12, "N_EVAL": 50, "lr": 1e-4}, smoke=False)
    assert [s.run_name for s in specs] == ["dpo_k4_s0", "nca_k4_s0"]
    assert all((s.steps, s.n_eval, s.lr) == (12, 50, 1e-4) for s in specs)
    assert grid.specs(runs, {}, smoke=True)[0].steps == 3  # smoke sizes
    with pytest.raises(SystemExit, match="steps must be an integer >= 1, got 0"):
        grid.specs(runs, {"STEPS": 0}, smoke=False)
    with pytest.raises(SystemExit, match="-p SEED: not a setting of the grid's runs"):
        grid.specs(runs, {"SEED": 3}, smoke=False)  # seeds come from --seeds
    with pytest.raises(SystemExit, match="-p WIDTH: not a setting"):
        grid.specs(runs, {"WIDTH": 3}, smoke=False)


def test_a_sweep_of_reward_sources_runs_every_method_on_each_source_seed_by_seed():
    runs = grid.plan_sources(["dpo", "nca"], [0, 1], ["rubric", "flr"])
    assert runs[:4] == [("dpo", 4, 0, "rubric"), ("nca", 4, 0, "rubric"), ("dpo", 4, 0, "flr"), ("nca", 4, 0, "flr")]
    assert len(runs) == 8 and runs[4][2] == 1
    specs = grid.specs(runs, {"STEPS": 10}, smoke=False)
    assert [s.run_name for s in specs[:4]] == ["dpo_k4_s0", "nca_k4_s0", "dpo_k4_s0_flr", "nca_k4_s0_flr"]
    with pytest.raises(SystemExit, match="--sources: unknown reward source 'gpt4'; one of rubric, embedding_bt"):
        grid.plan_sources(["nca"], [0], ["rubric", "gpt4"])
    with pytest.raises(SystemExit, match="-p REWARD_SOURCE: the reward source is swept by --sources"):
        grid.specs(runs, {"REWARD_SOURCE": "flr"}, smoke=False)
    with pytest.raises(SystemExit, match="steps must be at most 25 for reward_source flr"):
        grid.specs(runs, {"STEPS": 40}, smoke=False)


def test_collect_of_a_source_sweep_writes_the_source_table_and_the_gain_figure(tmp_path):
    records = []
    for source, quality, acc in (("rubric", 1.0, 0.35), ("flr", 0.6, 0.3), ("random", 0.5, 0.25)):
        for seed in (0, 1):
            for method in ("dpo", "nca"):
                r = fake_record(method, 4, seed, acc=acc + 0.01 * seed, chosen=[0.0, 0.1])
                r["run"] += "" if source == "rubric" else f"_{source}"
                r["reward_source"] = source
                r["reward_quality"] = {"accuracy": quality - 0.02 * seed, "spearman": quality, "top_label": 1.0}
                records.append(r)
    write_runs(tmp_path, records)
    grid.collect(tmp_path, docs=tmp_path / "docs", prefix="loop_")
    table = (tmp_path / "sources_table.md").read_text()
    assert "| base model | – | – | – | – | 0.2500 | 0 |" in table
    # mean [min, max] over the two seeds: reward accuracy, then held-out greedy accuracy and its gain over the base
    assert "| dpo | flr | 2 | 0.5900 [0.5800, 0.6000] | 0.6000 [0.6000, 0.6000] | 0.3050 [0.3000, 0.3100] | " \
           "0.0550 [0.0500, 0.0600] |" in table
    assert table.index("| nca | rubric |") < table.index("| dpo | flr |") < table.index("| dpo | random |")
    assert (tmp_path / "gain_vs_reward.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "loop_gain_vs_reward.png").exists()
    assert "| dpo | 4 | 2 |" in (tmp_path / "results_table.md").read_text()  # the rubric runs alone
