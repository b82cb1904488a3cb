#!/usr/bin/env python
"""The paper's likelihood claim at a longer horizon (Fig. 2 / 5): DPO, InfoNCA and NCA on the arithmetic K = 4 data
with SmolLM2-135M-Instruct, for many more optimizer steps than the tiny grid, logging the chosen (best-reward),
rejected (worst-reward) and mean response log-likelihood change at every step and the held-out greedy accuracy every
``--eval-every`` steps.

    python scripts/run_horizon.py --out runs/horizon --records results/horizon        # the 15 runs, resumable
    python scripts/run_horizon.py --out runs/horizon --records results/horizon --only dpo_s0 --steps 40  # a check

Runs: DPO (pairs), InfoNCA and NCA at alpha 0.01 and alpha 1 (K = 4), seeds 0 1 2, in the order seed 0 of every
configuration first. Each run goes through :class:`nca_kit.experiment.Experiment` (data, method rows, model with fresh
LoRA adapters) and :func:`nca_kit.training.train` with one extra Trainer callback that evaluates greedy accuracy on a
fixed set of held-out prompts. The log-likelihoods are those of the training batch, read from the loss's own forward
(``logps/chosen_delta``, ``logps/rejected_delta``, ``kl`` = mean over the K responses of ``log pi - log mu``).

A finished run writes ``<records>/<run>.json`` (settings, per-step curves, held-out accuracy curve, wall time; no
weights) and is skipped on the next call, so an interrupted set resumes; a run interrupted mid-way resumes from its
last checkpoint (every ``--eval-every`` steps) with its logged curves. The trainer's output folder (``<out>/<run>/``)
is scratch and is not committed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = (("dpo", None), ("infonca", 0.01), ("nca", 0.01), ("infonca", 1.0), ("nca", 1.0))


def run_name(method: str, alpha, seed: int) -> str:
    return f"{method}_s{seed}" if alpha is None else f"{method}_a{alpha:g}_s{seed}"


def plan(seeds) -> list[tuple[str, float | None, int]]:
    """(method, alpha, seed) in execution order: every configuration at seed 0, then seed 1, ..."""
    return [(m, a, s) for s in seeds for m, a in CONFIGS]


class HeldOutAccuracy:
    """Trainer callback: greedy accuracy on fixed held-out problems at step 0 and every ``every`` steps."""

    def __init__(self, problems, tokenizer, every: int, max_new_tokens: int, cache: dict, path: Path,
                 on_save=None):
        from transformers import TrainerCallback

        self.problems, self.tokenizer, self.every = problems, tokenizer, every
        self.max_new_tokens, self.cache, self.path = max_new_tokens, cache, Path(path)
        self.curve: dict[str, list] = {"step": [], "accuracy": [], "correct": []}
        outer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.resume(state.global_step)
                if state.global_step == 0:
                    outer.measure(model, 0)

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % outer.every == 0 or state.global_step == state.max_steps:
                    outer.measure(model, state.global_step)

            def on_save(self, args, state, control, **kw):  # after the step's log line: a partial record
                if on_save is not None:
                    on_save(state.global_step)

        self.callback = _CB()

    def resume(self, step: int) -> None:
        """Keep the measurements up to ``step`` (a resumed run) from ``path``, one JSON line each."""
        kept = []
        if step and self.path.exists():
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [row for row in kept if row["step"] <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        for row in kept:
            for key in self.curve:
                self.curve[key].append(row[key])

    def measure(self, model, step: int) -> None:
        from nca_kit.sampling import sample_responses
        from nca_kit.tasks import score

        if step in self.curve["step"]:
            return
        if step == 0 and "base" in self.cache:  # LoRA starts at zero: step 0 is the base model, the same every run
            correct = self.cache["base"]
        else:
            was_training = model.training
            model.eval()
            texts, cuts = sample_responses(model, self.tokenizer, [p.messages for p in self.problems], k=1,
                                           greedy=True, max_new_tokens=self.max_new_tokens,
                                           batch_size=len(self.problems), progress=False)
            if was_training:
                model.train()
            correct = [int(score(t[0], p.answer, truncated=c[0]).correct)
                       for t, c, p in zip(texts, cuts, self.problems)]
            if step == 0:
                self.cache["base"] = correct
        self.curve["step"].append(step)
        self.curve["correct"].append(correct)
        self.curve["accuracy"].append(sum(correct) / len(correct))
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "accuracy": sum(correct) / len(correct), "correct": correct}) + "\n")


CURVE_KEYS = {"chosen": "logps/chosen_delta", "rejected": "logps/rejected_delta", "mean": "kl",
              "chosen_logp": "logps/chosen", "rejected_logp": "logps/rejected", "margin": "rewards/margin",
              "reward_accuracy": "rewards/accuracy", "loss": "loss", "lr": "learning_rate"}


def one_run(method, alpha, seed, args, cache) -> dict:
    from nca_kit.experiment import Experiment, ExperimentSpec
    from nca_kit.training import train

    spec = ExperimentSpec(model=args.model, n_train=args.n_train, n_test=args.n_test,
                          max_new_tokens=args.max_new_tokens, method=method, k=args.k,
                          alpha=0.01 if alpha is None else alpha, beta=args.beta, lr=args.lr, steps=args.steps,
                          batch=args.batch, seed=seed, n_eval=args.n_eval, warmup_ratio=args.warmup_ratio)
    name = run_name(method, alpha, seed)
    started, cpu = time.time(), time.process_time()
    dirs = {} if args.cache is None else {"data_dir": args.cache / "data", "cache_dir": args.cache}
    exp = Experiment(spec, out=args.out, reuse_model=True, **dirs)
    exp.run_dir = Path(args.out) / name
    exp.load_data()
    exp.method_rows()
    exp.load_model()
    resume = "latest" if any(exp.run_dir.glob("checkpoint-*")) else None  # an interrupted run goes on
    config = dataclasses.replace(spec.train_config(exp.run_dir), save_figure=False, save_steps=args.eval_every,
                                 save_total_limit=1, resume_from_checkpoint=resume)

    def record(metrics, status):
        steps = [m for m in metrics if "logps/chosen_delta" in m]
        curves = {"step": [m.get("step") for m in steps]}
        for key, metric in CURVE_KEYS.items():
            curves[key] = [m.get(metric) for m in steps]
        return {
            "run": name, "status": status, "method": method, "loss_type": spec.loss_type, "alpha": alpha,
            "beta": spec.beta,
            "lr": spec.lr, "steps": spec.steps, "batch": spec.batch, "seed": seed, "k_trained": spec.k_trained,
            "spec": spec.to_dict(),
            "data": {"file": Path(exp.dataset.path).name, "usable_rows": exp.usable_rows,
                     "train_rows": len(exp.train_rows)},
            "heldout": {"n_prompts": len(exp.problems), "ids": [p.id for p in exp.problems], **held.curve},
            "curves": curves,
            "wall_seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "resumed_from": resume,
            "command": "python scripts/run_horizon.py " + " ".join(args.argv),
        }

    def save_partial(step):
        from nca_kit.training import read_metrics

        partial = record(read_metrics(exp.run_dir / "metrics.jsonl"), f"partial: {step} of {spec.steps} steps")
        partial["wall_seconds"] = partial["cpu_seconds"] = None  # a partial run has no total time yet
        (Path(args.records) / f"{name}.partial.json").write_text(json.dumps(partial, indent=1) + "\n")

    held = HeldOutAccuracy(exp.problems, exp.tokenizer, args.eval_every, spec.max_new_tokens, cache,
                           exp.run_dir / "heldout.jsonl", on_save=save_partial)
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(config, model=exp.model, tokenizer=exp.tokenizer, dataset=exp.train_rows,
                       callbacks=[held.callback])
    return record(result.metrics, "done")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/horizon", help="scratch trainer folders (not committed)")
    parser.add_argument("--records", default="results/horizon", help="one JSON record per finished run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=1, help="prompts per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--n-eval", type=int, default=16, help="fixed held-out prompts for greedy accuracy")
    parser.add_argument("--eval-every", type=int, default=30, help="held-out accuracy and a checkpoint every N steps")
    parser.add_argument("--only", nargs="*", default=None, help="run names to run (e.g. dpo_s0 nca_a0.01_s0)")
    # the data and model (defaults: the committed arithmetic set and SmolLM2; the tests use a tiny model)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=None, help="dataset and base-evaluation cache (default: runs/cache)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    records = Path(args.records)
    records.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    failed = 0
    for method, alpha, seed in plan(args.seeds):
        name = run_name(method, alpha, seed)
        if args.only is not None and name not in args.only:
            continue
        path = records / f"{name}.json"
        if path.exists():
            print(f"[skip] {name}: {path} exists", flush=True)
            continue
        print(f"[run] {name} ...", flush=True)
        try:
            record = one_run(method, alpha, seed, args, cache)
        except Exception as err:  # report, go on
            import traceback

            traceback.print_exc()
            print(f"[fail] {name}: {err}", flush=True)
            failed += 1
            continue
        path.write_text(json.dumps(record, indent=1) + "\n")
        (records / f"{name}.partial.json").unlink(missing_ok=True)
        c = record["curves"]
        print(f"[done] {name}: {record['wall_seconds']} s, chosen {c['chosen'][-1]:+.2f}, margin "
              f"{c['margin'][-1]:+.3f}, held-out acc {record['heldout']['accuracy'][-1]:.3f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
