"""Two processes (CPU, gloo) train exactly like one with the same global batch.

One start of ``tests/multiprocess_worker.py`` in 2 processes (``torchrun``, as a user would on CPU) runs: a reward
run (the K = 3 / 4 fixture, length grouping, checkpoints), a pairwise run, and a resume of the reward run from its
checkpoint in the second epoch. Side by side, a second start does the first two runs in one process. Compared:
per-step losses and every logged metric, the final adapter, the cached reference column, which prompts each step
trained on, and who wrote which file.

LoRA dropout is off: each process draws its own dropout masks, so with dropout on the runs differ by design.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from nca_kit.training import read_metrics

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
COMMON = dict(lora_dropout=0.0, save_figure=True, disable_tqdm=True, save_total_limit=None)


def plan(folder: Path, two: bool) -> list[dict]:
    reward = dict(config="configs/tiny_cpu.yaml", record=str(folder / "reward"),
                  overrides={**COMMON, "output_dir": str(folder / "reward"), "max_steps": 6, "save_steps": 4})
    pairwise = dict(config="configs/tiny_cpu.yaml", record=str(folder / "pairwise"),
                    overrides={**COMMON, "output_dir": str(folder / "pairwise"), "max_steps": 3,
                               "dataset": "tests/fixtures/tiny_pairwise.jsonl", "loss_type": "dpo"})
    resumed = dict(config="configs/tiny_cpu.yaml", record=str(folder / "resumed"),
                   resume_from=[str(folder / "reward"), 4, 5],  # 3 steps an epoch: checkpoint-4 is in epoch 2
                   overrides={**reward["overrides"], "output_dir": str(folder / "resumed"),
                              "resume_from_checkpoint": "latest"})
    return [reward, pairwise, resumed] if two else [reward, pairwise]


def records(prefix: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in prefix.parent.glob(prefix.name + ".rank*.json")),
                  key=lambda r: r["rank"])


def steps(folder: Path) -> list[dict]:
    return [m for m in read_metrics(folder) if "loss" in m]


def max_metric_diff(a: list[dict], b: list[dict]) -> float:
    """Largest difference between the logged metrics of two runs, relative for values beyond 1 in size (summed
    log-probs are near -280, where float32 resolves 3e-5)."""
    assert [sorted(m) for m in a] == [sorted(m) for m in b], "the same metrics at the same steps"
    return max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for x, y in zip(a, b) for k in x
               if isinstance(x[k], (int, float)))


def launch_side_by_side(two: Path, one: Path, launcher: list[str]) -> None:
    """Run the worker on ``two/plan.json`` under ``launcher`` (2 processes) and on ``one/plan.json`` in one plain
    process, at the same time; each must exit 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "NCA_KIT_SMOKE": "1"}
    launches = [subprocess.Popen([*command, "tests/multiprocess_worker.py", str(folder / "plan.json")],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for folder, command in ((two, launcher), (one, [sys.executable]))]
    for launch in launches:
        output, _ = launch.communicate(timeout=600)
        assert launch.returncode == 0, output[-3000:]


def global_batches(ranks: list[dict], single: dict) -> tuple[list, list]:
    """The prompts of each optimizer step: the 2 processes' batches of a step, and one process's 2 micro-batches."""
    per_step_two = [sorted(map(tuple, ranks[0]["batches"][s] + ranks[1]["batches"][s]))
                    for s in range(len(ranks[0]["batches"]))]
    per_step_one = [sorted(map(tuple, single["batches"][2 * s] + single["batches"][2 * s + 1]))
                    for s in range(len(single["batches"]) // 2)]
    return per_step_two, per_step_one


def max_adapter_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert set(wa) == set(wb)
    return max(float((wa[n] - wb[n]).abs().max()) for n in wa)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    for folder, is_two in ((two, True), (one, False)):
        folder.mkdir()
        (folder / "plan.json").write_text(json.dumps(plan(folder, is_two)))
    launch_side_by_side(two, one, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node", "2"])

    diffs = {}
    for name, kind_k in (("reward", {3, 4}), ("pairwise", {2})):
        ranks, single = records(two / name), records(one / name)[0]
        assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
        # the same global batch: one process's 2 micro-batches of a step = the 2 processes' batches of that step
        per_step_two, per_step_one = global_batches(ranks, single)
        assert per_step_two == per_step_one
        assert {k for _, k in sum(per_step_two, [])} == kind_k  # every prompt with all its responses, on one process
        for rank in ranks:
            assert np.allclose(np.concatenate(rank["reference"]), np.concatenate(single["reference"]), atol=TOL)
        diffs[f"{name} reference"] = max(float(np.abs(np.concatenate(r["reference"]) -
                                                      np.concatenate(single["reference"])).max()) for r in ranks)
        # written once, by the main process
        assert ranks[1]["writes"] == [], ranks[1]["writes"]
        assert sorted(set(ranks[0]["writes"])) == sorted(set(single["writes"]))
        assert ranks[0]["writes"].count("cache:reference_logps") == 1 and len(single["reference"]) == 12 - 4 * (
            name == "pairwise")
        assert len(read_metrics(two / name)) == len(read_metrics(one / name))  # no line logged twice
        diffs[f"{name} metrics"] = max_metric_diff(steps(two / name), steps(one / name))
        diffs[f"{name} adapter"] = max_adapter_diff(two / name, one / name)
    assert "model:checkpoint-4" in records(two / "reward")[0]["writes"]

    resumed = records(two / "resumed")
    assert resumed[0]["writes"].count("cache:reference_logps") == 0  # the reference was read back, not recomputed
    diffs["resumed metrics"] = max_metric_diff(steps(two / "resumed"), steps(two / "reward"))
    diffs["resumed adapter"] = max_adapter_diff(two / "resumed", two / "reward")
    print("max differences (metrics: relative beyond 1 in size):", json.dumps(diffs, indent=1))
    assert max(diffs.values()) < TOL, diffs
