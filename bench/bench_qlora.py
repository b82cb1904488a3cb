"""SmolLM2-135M-Instruct on the arithmetic data, notebook 20's recipe, with the base in 4-bit NF4 (QLoRA) vs in full
precision (LoRA): the same spec, steps and seed; loss, held-out accuracy, time per step and peak memory.

Each variant runs in a process of its own (its peak resident memory is its own), both started together so that they
share the machine's load alike:

    OMP_NUM_THREADS=1 python bench/bench_qlora.py --out runs/bench_qlora --record results/qlora_smollm2.json

``--variant qlora|lora`` runs one variant in this process and prints its JSON line (what the parent collects).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variant(variant: str, out: Path, steps: int, n_eval: int) -> dict:
    import torch
    from transformers import set_seed

    from nca_kit import eval as ev
    from nca_kit.experiment import Experiment, ExperimentSpec
    from nca_kit.models import LoraSettings, compute_dtype_for, load_model

    spec = ExperimentSpec(steps=steps, n_eval=n_eval)  # notebook 20's defaults otherwise (nca, K 4, rubric, seed 0)
    run = Experiment(spec, out=out / variant, cache_dir=out / variant / "cache")  # a base evaluation of its own
    run.load_data()
    run.method_rows()
    started = time.time()
    set_seed(spec.seed)
    run.model, run.tokenizer = load_model(spec.model, device=spec.device, lora=LoraSettings(),
                                          quantize_4bit=(variant == "qlora"))
    run.seconds["model"] = round(time.time() - started, 1)
    run.problems = ev.problems_from(run.test_split.select(range(spec.n_eval)))
    run.evaluate_base()
    with contextlib.redirect_stdout(io.StringIO()):
        run.train()
    run.evaluate()
    record = run.record()
    steps_logged = [m for m in run.result.metrics if "loss" in m]
    return {
        "variant": variant, "quantize_4bit": variant == "qlora",
        "compute_dtype": str(compute_dtype_for("cpu")).removeprefix("torch.") if variant == "qlora" else "float32",
        "steps": spec.steps, "batch": spec.batch, "k": spec.k, "n_eval": spec.n_eval, "seed": spec.seed,
        "first_loss": steps_logged[0]["loss"], "final_loss": record["final_loss"],
        "mean_loss": sum(m["loss"] for m in steps_logged) / len(steps_logged),
        "base_greedy_accuracy": record["base"]["greedy_accuracy"],
        "trained_greedy_accuracy": record["trained"]["greedy_accuracy"],
        "trained_sample_reward": record["trained"]["sample_reward"], "kl": record["trained"]["kl"],
        "train_seconds": record["train_seconds"], "seconds_per_step": record["train_seconds"] / spec.steps,
        "seconds": record["seconds"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("qlora", "lora"))
    parser.add_argument("--out", default="runs/bench_qlora")
    parser.add_argument("--record", default="results/qlora_smollm2.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n_eval", type=int, default=100)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, out, args.steps, args.n_eval)), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--out", str(out), "--steps", str(args.steps), "--n_eval", str(args.n_eval)]
    started = time.time()
    children = {v: subprocess.Popen([*command, "--variant", v], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for v in ("qlora", "lora")}
    results = []
    for variant, child in children.items():
        output, _ = child.communicate()
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not lines:
            sys.stderr.write(output[-4000:])
            return 1
        results.append(json.loads(lines[-1][len("RESULT "):]))
    record = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/bench_qlora.py "
                         f"--steps {args.steps} --n_eval {args.n_eval}",
              "note": "both variants side by side, one process each, on a shared 2-core CPU",
              "wall_seconds": round(time.time() - started, 1), "runs": results}
    Path(args.record).parent.mkdir(parents=True, exist_ok=True)
    Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    for r in results:
        print(f"{r['variant']:6s} loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}  greedy acc "
              f"{r['base_greedy_accuracy']:.3f} -> {r['trained_greedy_accuracy']:.3f}  "
              f"{r['seconds_per_step']:.2f} s/step  peak RSS {r['peak_rss_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
