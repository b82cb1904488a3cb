"""The training runs of ``tests/test_multiprocess.py``, in every process of a CPU (gloo) process group.

    torchrun --standalone --nproc_per_node 2 tests/multiprocess_worker.py plan.json   # 2 processes
    python tests/multiprocess_worker.py plan.json                                     # 1 process
    accelerate launch --config_file configs/accelerate/fsdp_full_shard.yaml --num_processes 2 ... \
        tests/multiprocess_worker.py plan.json                                        # tests/test_fsdp_cpu.py

(``accelerate launch --cpu --num_processes 2`` starts only one process: on CPU accelerate needs ``mpirun`` for more.
``torchrun`` starts the processes; the kit's code finds the group itself, as it does under ``torchrun -m
nca_kit.train``, so nothing here sets up the distributed state before the first run.)

``plan.json`` lists runs ``{"config": yaml, "overrides": {...}, "record": path, "resume_from": optional}``, done in
order in the same processes (one start-up for all). Each run goes through :func:`nca_kit.training.train` as the
command line does; the worker only watches: every process writes ``<record>.rank<R>.json`` with the training
micro-batches it computed a loss on (a digest of each prompt and its number of responses), the cached reference
column it trained with, which files it wrote (cache entries, ``config.yaml``, figures, model saves), the distributed
type accelerate chose and the class that wrapped the model for training.
``resume_from`` ``[folder, step, last_logged_step]`` first copies that run's checkpoint, cached reference and
metrics into the run's folder (main process), as a run killed after ``last_logged_step`` would leave it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import Trainer

import nca_kit.plots
from nca_kit.cache import Cache
from nca_kit.training import NCATrainer, TrainConfig, train

batches: list[list[list]] = []  # one entry per training micro-batch: [prompt digest, number of responses] per prompt
writes: list[str] = []  # what this process wrote


def _compute_loss(self, model, inputs, *args, _original=NCATrainer.compute_loss, **kwargs):
    if model.training:  # a training micro-batch: which prompts, with how many responses
        prompt_tokens = inputs["attention_mask"].bool() & ~inputs["loss_mask"]  # (N, T)
        counts = inputs["response_mask"].sum(-1)  # (B,)
        first = torch.cumsum(counts, 0) - counts  # (B,): each prompt's first sequence
        batches.append([[hashlib.sha256(str(inputs["input_ids"][n][prompt_tokens[n]].tolist()).encode()).hexdigest()
                         [:12], int(k)] for n, k in zip(first.tolist(), counts.tolist())])
    return _original(self, model, inputs, *args, **kwargs)


def _watch(owner, name, describe):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        label = describe(*args, **kwargs)
        if label:
            writes.append(label)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def install() -> None:
    """Start watching."""
    NCATrainer.compute_loss = _compute_loss
    _watch(Cache, "_write", lambda self, path, *a, **k: f"cache:{Path(path).parent.name}")
    _watch(TrainConfig, "to_yaml", lambda self, path=None: path is not None and f"config:{Path(path).name}")
    _watch(nca_kit.plots, "plot_training_trends",
           lambda *a, path=None, **k: path is not None and f"figure:{Path(path).name}")
    _watch(Trainer, "_save",  # called in every process; the one with should_save writes
           lambda self, output_dir=None, *a, **k: self.args.should_save and f"model:{Path(output_dir).name}")


def copy_checkpoint(source: str, folder: Path, step: int, last_logged_step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in (f"checkpoint-{step}", "reference_logps"):
        shutil.copytree(Path(source) / name, folder / name)
    lines = (Path(source) / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= last_logged_step]
    (folder / "metrics.jsonl").write_text("\n".join(kept) + "\n")


def main(plan_path: str) -> None:
    torch.set_num_threads(1)
    install()
    for job in json.loads(Path(plan_path).read_text()):
        config = TrainConfig.from_yaml(job["config"], job["overrides"])
        if job.get("resume_from"):
            state = PartialState()  # set up by the runs before this one
            if state.is_main_process:
                copy_checkpoint(job["resume_from"][0], Path(config.output_dir), *job["resume_from"][1:])
            state.wait_for_everyone()
        batches.clear()
        writes.clear()
        result = train(config)
        args = result.trainer.args
        record = {"rank": args.process_index, "world": args.world_size, "batches": batches, "writes": writes,
                  "distributed_type": str(result.trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
                  "wrapper": type(result.trainer.model_wrapped).__name__,
                  "reference": [list(map(float, r)) for r in result.trainer.train_dataset["reference_logps"]]}
        Path(f"{job['record']}.rank{args.process_index}.json").write_text(json.dumps(record))
        result.trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
