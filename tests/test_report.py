"""nca_kit.report: the committed results pages equal what the committed records regenerate, and its pieces."""

import json
import math

import numpy as np
import pytest

from nca_kit import report, report_grids

pytestmark = pytest.mark.usefixtures("one_thread")


def test_committed_pages_match_their_records():
    """The check CI runs: every generated page and block rebuilt from results/ and the stored outputs it names."""
    assert report.main(["--check"]) == 0


def test_null_range_matches_known_expected_range():
    # sd of a cell: noise * sqrt(pi) / 2 / sqrt(2); the expected range of 9 normal draws is 2.970 sd (d2 constant)
    noise = 0.3
    sd = noise * math.sqrt(math.pi) / 2 / math.sqrt(2)
    out = report_grids.null_range(9, noise, draws=100_000)
    assert out["expected"] == pytest.approx(2.970 * sd, rel=0.01)
    assert out["q95"] > out["expected"]


def test_replace_block_needs_its_markers():
    text = "a\n<!-- report:x -->\nold\n<!-- /report:x -->\nb\n"
    assert report.replace_block(text, "x", "new") == "a\n<!-- report:x -->\nnew\n<!-- /report:x -->\nb\n"
    with pytest.raises(ValueError):
        report.replace_block("no markers", "x", "new")


def _record(method, alpha, seed, slope, status="done", steps=30):
    rng = np.random.default_rng(seed)
    x = np.arange(1, steps + 1)
    chosen = (slope / 100 * x + rng.normal(0, 0.01, steps)).tolist()
    return {"run": f"{method}_{alpha}_{seed}", "status": status, "method": method, "alpha": alpha, "beta": 0.1,
            "lr": 5e-4, "steps": steps, "batch": 1, "seed": seed,
            "heldout": {"n_prompts": 4, "step": [0, steps], "accuracy": [0.25, 0.5],
                        "correct": [[1, 0, 0, 0], [1, 1, 0, 0]]},
            "curves": {"step": x.tolist(), "chosen": chosen, "rejected": [-v for v in chosen],
                       "mean": [0.0] * steps, "margin": [0.1] * steps},
            "wall_seconds": 10.0}


def test_horizon_page_slopes_and_verdicts(tmp_path):
    records = [_record("dpo", None, s, -20.0) for s in range(3)]
    records += [_record("nca", 0.01, s, +10.0) for s in range(3)]
    records += [_record("infonca", 0.01, s, -5.0) for s in range(2)]
    records += [_record("infonca", 0.01, 2, -5.0, status="partial: 15 of 30 steps")]
    for r in records:
        name = r["run"] + (".partial" if r["status"] != "done" else "")
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    loaded = report.load_horizon(tmp_path)
    assert len(loaded) == 9
    page = tmp_path / "page.md"
    report.horizon_page(loaded, tmp_path, page)
    text = page.read_text()
    dpo = next(line for line in text.splitlines() if line.startswith("| DPO | 3 |"))
    assert "-20.0" in dpo and "| falls | holds |" in dpo
    nca = next(line for line in text.splitlines() if line.startswith("| NCA α=0.01 | 3 |"))
    assert "holds (rises)" in nca
    assert "| InfoNCA α=0.01 | 2 |" in text  # the partial seed is listed but not in the verdict
    assert "α = 0.01: +15.0" in text  # NCA - InfoNCA paired over the two seeds both finished
    assert (tmp_path / "horizon_likelihood.png").exists() and (tmp_path / "horizon_accuracy.png").exists()


def test_flr_block_recomputes_accuracies_and_paired_differences_from_the_stored_rewards(tmp_path):
    """Direct wins 3 of 4 pairs, FLR (paper) 1 of 4: the block must say 0.750 / 0.250 and a negative difference."""
    direct = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # chosen at even rows
    flr = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    record = {"command": "python scripts/flr_eval.py --pairs 4", "model": "tiny", "wall_seconds": 60.0,
              "hh": {"n_pairs": 4, "seed": 0,
                     "rewards": {"Direct | -": direct, "FLR (paper) | all": flr, "FLR (paper) | relevance": direct,
                                 "FLR (paper) | correctness": flr},
                     "disagreement": {"pairs_ordered_differently": 0.5, "spearman_rewards": 0.1,
                                      "spearman_margins": -0.2}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(record))
    text = report.flr_block(path)
    assert "| Direct | 0.750 [" in text and "| FLR (paper) | 0.250 [" in text
    assert "| relevance 0.750 | -0.500 [" in text
    assert "relevance 0.750, correctness 0.250" in text.replace(" / ", "")


def test_alpha_beta_records_are_exported_and_tabulated(tmp_path):
    """run_grid --records writes each run's record without local paths; the report's tables and noise rows are
    computed from those records (cell means, ranges and seed noise by hand)."""
    from nca_kit import grid

    runs = tmp_path / "runs"
    values = {("nca", 0.01, 0.1): [1.0, 2.0], ("nca", 1.0, 0.1): [4.0, 3.0], ("dpo", None, 0.1): [2.5, 2.5]}
    for (method, alpha, beta), per_seed in values.items():
        cell = f"alpha{alpha:g}_beta{beta:g}" if alpha is not None else f"beta{beta:g}"
        for seed, value in enumerate(per_seed):
            folder = runs / cell / "tiny_runs" / f"{method}_k4_s{seed}"
            folder.mkdir(parents=True)
            record = {"method": method, "alpha": alpha if alpha is not None else 0.01, "beta": beta, "seed": seed,
                      "trained": {"sample_reward": value, "greedy_accuracy": value / 10, "kl": 0.1},
                      "trend": {"step": [1, 2], "chosen": [0.0, value - 2.0 if method == "nca" else -0.5]},
                      "paths": {"run": str(folder)}}
            (folder / "results.json").write_text(json.dumps(record))
    written = grid.export_records(runs, tmp_path / "records")
    assert len(written) == 6 and all("paths" not in json.loads(p.read_text()) for p in written)
    records = report_grids.load_alpha_beta(tmp_path / "records")
    tables = report_grids.alpha_beta_tables_block(records)
    # nca: cells 1.5 and 3.5 -> mean 2.5, range 2; seed noise over the 3 cells: (1 + 1 + 0) / 3
    assert "| sample_reward | nca | 2 | 2.5000 | 1.5000 | 3.5000 | 2.0000 | 0.6667 |" in tables
    assert "| nca | 0.1 | 1.5000 (2) | 3.5000 (2) |  |" in tables and "| dpo | 0.1 |  |  | 2.5000 (2) |" in tables
    assert "| nca | 4 | -1.00 | +2.00 | 1 | seed 0: 1 |" in tables and "| dpo | 2 | -0.50 | -0.50 | 2 |" in tables
    noise = report_grids.alpha_beta_block(records)
    assert "| sample_reward | nca | 2 | 2.0000 |" in noise and "results/alpha_beta/" in noise


def test_flr_figures_are_drawn_from_the_record(tmp_path):
    """The three FLR figures come from results.json alone (no model, no score cache)."""
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    hh_table = [{"scorer": s, "category": c, "accuracy": a, "low": a - 0.1, "high": a + 0.1, "n": 8}
                for s, c, a in [("Direct", "-", 0.6), ("FLR (paper)", "all", 0.5), ("FLR (paper)", "relevance", 0.4),
                                ("FLR (code)", "all", 0.55), ("FLR (code)", "relevance", 0.45)]]
    arith_table = [{"scorer": s, "category": c, "correct_pair_accuracy": a, "correct_pair_low": a - 0.1,
                    "correct_pair_high": a + 0.1, "n_correct_pairs": 12, "best_of_k": 3.0, "random": 2.0,
                    "oracle": 4.0} for s, c, a in [("Direct", "-", 0.8), ("FLR (paper)", "all", 0.5)]]
    record = {"model": "tiny", "command": "python scripts/flr_eval.py", "wall_seconds": 1.0,
              "hh": {"n_pairs": 8, "seed": 0, "table": hh_table,
                     "rewards": {"Direct | -": rng.normal(size=16).tolist(),
                                 "FLR (paper) | all": rng.normal(size=16).tolist()}},
              "arith": {"n_prompts": 6, "k": 4, "table": arith_table}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(record))
    written = report.flr_figures(path, tmp_path)
    assert [p.name for p in written] == ["rewards_flr_hh_accuracy.png", "rewards_flr_hh_distributions.png",
                                         "rewards_flr_arith.png"]
    for p in written:
        assert mpimg.imread(p).shape[0] > 100


def _grid_record(method, seed, *, acc, reward=2.0, chosen=-0.1, source="rubric", base_acc=0.25, k=None):
    summary = lambda a, r: {"n_prompts": 40, "greedy_accuracy": a, "sample_reward": r, "sample_accuracy": a,  # noqa: E731
                            "kl": 0.1}
    k = k if k is not None else (2 if method == "dpo" else 4)
    run = f"{method}_k{k}_s{seed}" + ("" if source == "rubric" else f"_{source}")
    return {"run": run, "method": method, "loss_type": method, "k": k, "alpha": 0.01, "beta": 0.1, "lr": 5e-4,
            "steps": 4, "batch": 4, "seed": seed, "smoke": False, "train_rows": 16, "train_seconds": 1.0,
            "final_loss": 0.5, "reward_source": source,
            "reward_quality": {"accuracy": 1.0 if source == "rubric" else 0.5, "spearman": 0.5, "top_label": 0.5},
            "base": summary(base_acc, 2.0), "trained": summary(acc, reward),
            "trend": {"step": [1, 2, 3, 4], "chosen": [0.0, 0.0, chosen, chosen], "rejected": [0.0, 0.0, -1.0, -1.0]},
            "seconds": {"total": 100.0 + seed, "train": 50.0}}


def test_plain_grid_records_are_exported_with_their_training_log(tmp_path):
    from nca_kit import grid

    runs = tmp_path / "runs"
    for seed in range(2):
        folder = runs / "tiny_runs" / f"nca_k4_s{seed}"
        folder.mkdir(parents=True)
        record = {**_grid_record("nca", seed, acc=0.3), "paths": {"run": str(folder)}}
        (folder / "results.json").write_text(json.dumps(record))
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "rewards/A0": 0.5 * (seed + 1)}) + "\n")
    written = grid.export_records(runs, tmp_path / "records")
    assert [p.name for p in written] == ["nca_k4_s0.json", "nca_k4_s1.json"]
    loaded = report_grids.load_run_records(tmp_path / "records")
    assert all("paths" not in r for r in loaded) and loaded[1]["log"] == [{"step": 1, "rewards/A0": 1.0}]
    implicit = report_grids.implicit_block(loaded, "records/")
    assert "| nca | 4 | 2 | 0.50 – 1.00 | [0.27, 0.73] |" in implicit  # sigma(-1) = 0.269, sigma(1) = 0.731


def test_tiny_verdicts_pair_methods_by_seed_with_t_intervals():
    """NCA - DPO greedy accuracy per seed is 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t(0.975, 2) 0.1 / sqrt(3)
    = 0.248, so [-0.048, +0.448] is 'not observed'; DPO's best-answer likelihood is -0.5 on every seed (sd 0: the
    interval is the point, 'holds' for a fall)."""
    records = [_grid_record("dpo", s, acc=0.3, chosen=-0.5) for s in range(3)]
    records += [_grid_record("nca", s, acc=0.3 + 0.1 * (s + 1), chosen=0.2 + 0.1 * s) for s in range(3)]
    records += [_grid_record("infonca", s, acc=0.3, chosen=-0.2) for s in range(3)]
    text = report_grids.tiny_verdicts_block(records, "results/x/")
    row = next(line for line in text.splitlines() if line.startswith("| Table 2 / 3: NCA − DPO, greedy"))
    assert "| 3 | +0.200 [-0.048, +0.448] | > 0 | **not observed** |" in row
    row = next(line for line in text.splitlines() if line.startswith("| Fig. 5: DPO,"))
    assert "-0.500 [-0.500, -0.500] nats | < 0 | **holds** |" in row
    row = next(line for line in text.splitlines() if line.startswith("| Fig. 5: NCA,"))
    assert "+0.300 [+0.052, +0.548] nats | > 0 | **holds** |" in row  # 0.3 ± 4.303 * 0.1 / sqrt(3)
    assert "| dpo | 0.30 | 2.00 | -0.50 | -1.00 |" in report_grids.seed_block(records, "results/x/")
    table = report_grids.tiny_table_block(records, "results/x/")
    assert "9 run records in `results/x/` (seeds 0, 1, 2)" in table and "| nca | 4 | 3 | 0.5000 [0.4000, 0.6000]" in table


def test_loop_verdicts_compare_sources_and_methods_paired_by_seed():
    records = []
    for s in range(3):
        records += [_grid_record("nca", s, acc=0.35, reward=2.5 + 0.1 * s),
                    _grid_record("nca", s, acc=0.2, reward=1.5, source="random"),
                    _grid_record("dpo", s, acc=0.35, reward=2.5, source="rubric"),
                    _grid_record("dpo", s, acc=0.2, reward=1.7 - 0.2 * s, source="random")]
    text = report_grids.loop_verdicts_block(records, "results/loop/")
    row = next(line for line in text.splitlines() if "nca rubric − random, Δ sample reward" in line)
    assert "| 3 | +1.100 [+0.852, +1.348] | > 0 | **holds** |" in row  # 1.0, 1.1, 1.2
    row = next(line for line in text.splitlines() if "NCA forgives a poorer reward more" in line)
    # NCA drop (random - rubric): -1.0, -1.1, -1.2; DPO drop: -0.8, -1.0, -1.2 -> difference -0.2, -0.1, 0.0
    assert "| 3 | -0.100 [-0.348, +0.148] | > 0 | **not observed** |" in row
    assert "over all 12 runs" in text
    table = report_grids.loop_table_block(records, "results/loop/")
    assert "12 run records" in table and "100–102 s, median 101 s" in table
