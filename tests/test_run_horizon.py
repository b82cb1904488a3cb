"""scripts/run_horizon.py on a tiny random model: a record per run, partial records at checkpoints, resume."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import run_horizon  # noqa: E402


def test_plan_runs_seed_zero_of_every_configuration_first():
    runs = run_horizon.plan([0, 1])
    assert [r[2] for r in runs] == [0] * 5 + [1] * 5
    assert [run_horizon.run_name(*r) for r in runs[:5]] == ["dpo_s0", "infonca_a0.01_s0", "nca_a0.01_s0",
                                                           "infonca_a1_s0", "nca_a1_s0"]


@pytest.mark.slow  # samples a tiny dataset, trains 4 steps twice over: about a minute on a busy CPU
def test_a_tiny_run_writes_its_record_and_resumes(tmp_path):
    args = ["--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec"), "--cache", str(tmp_path / "cache"),
            "--model", "tiny-mistral", "--k", "3", "--n-train", "8", "--n-test", "4", "--max-new-tokens", "6",
            "--steps", "4", "--batch", "2", "--lr", "1e-2", "--n-eval", "4", "--eval-every", "2", "--seeds", "0",
            "--only", "nca_a0.01_s0"]
    assert run_horizon.main(args) == 0
    record = json.loads((tmp_path / "rec" / "nca_a0.01_s0.json").read_text())
    assert record["status"] == "done" and record["steps"] == 4
    assert record["curves"]["step"] == [1, 2, 3, 4]
    assert record["heldout"]["step"] == [0, 2, 4] and len(record["heldout"]["correct"][0]) == 4
    assert not (tmp_path / "rec" / "nca_a0.01_s0.partial.json").exists()
    first = record["curves"]["chosen"]
    # an interrupted run: the record gone, its trainer folder (checkpoint at step 4) kept -> it resumes, not restarts
    (tmp_path / "rec" / "nca_a0.01_s0.json").unlink()
    assert run_horizon.main(args) == 0
    again = json.loads((tmp_path / "rec" / "nca_a0.01_s0.json").read_text())
    assert again["resumed_from"] == "latest"
    assert again["curves"]["chosen"] == first and again["heldout"]["step"] == [0, 2, 4]
    assert run_horizon.main(args) == 0  # a finished run is skipped
