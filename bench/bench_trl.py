"""The kit's pairwise trainer side by side with TRL's ``DPOTrainer`` on the same HH-RLHF pairs.

Both train the same tiny random Llama (SmolLM2's vocabulary and tokenizer, LoRA r = 16 on all projections, no
dropout) in fp32 on the CPU without gradient checkpointing (set explicitly: TRL's ``DPOConfig`` defaults to bf16 and
gradient checkpointing), on the same token sequences, in the same order, with the same optimizer settings, and
with reference log-probs computed once before training in both (TRL: ``precompute_ref_log_probs=True``; the kit:
``NCATrainer.precompute_reference_logps``). Losses: pairwise NCA (TRL ``nca_pair``), DPO (``sigmoid``) and IPO
(``ipo``; TRL divides each log-ratio by its completion's token count, so the kit runs IPO with
``average_logps=True``, the same normalisation).

Same tokens: TRL tokenizes the pairs (prompt = the chat-template text, completions end with EOS) and the kit trains
on TRL's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``; only pairs that fit ``--max-length`` untruncated are
kept, so neither side's truncation rule matters.

Four trainers per loss (``--modes``):

* ``kit``: the kit with its default layout (``TrainConfig.logps_forward``, ``auto``: per batch padded / packed / tree);
* ``kit_padded``: the kit with the padded layout, the only layout TRL 1.16 has (its ``padding_free`` is disabled);
* ``trl``: TRL as shipped. Its fused log-prob head (``trl.trainer.utils``) scores only the completion positions when
  ``trl.kernels.chunked_logprob._use_triton(device)`` is true, which is on CUDA/XPU with Triton installed; on the CPU
  it projects *every* position of the padded batch (prompt and padding too) through the vocabulary and computes the
  per-token metrics there. This is TRL's CPU fallback path;
* ``trl_gpu``: TRL with that one decision patched to its GPU behaviour (``trl.trainer.utils._use_triton`` returns
  True, so ``compact`` holds and only completion positions are scored). The kernel that folds the vocabulary tiles
  stays the torch one (``chunked_logprob`` keeps its own ``_use_triton``), so the arithmetic is the GPU path's, done
  by torch. **This is the mode a GPU user gets**; ``trl`` is what a CPU user gets.

Each run is a fresh subprocess (its peak RSS is the run's); within each repeat the modes run one after another in
an order rotated per repeat, so every ratio compares runs made side by side under the same machine load.
Examples/s counts the steps after the first (timed between ``on_step_end`` events), and the losses of the first steps
are compared.

    python bench/bench_trl.py                      # nca, dpo, ipo; 3 rotated repeats of 4 modes each
    python bench/bench_trl.py --losses nca --repeats 3 --json runs/trl.json

TRL is an optional dependency (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

TRL_LOSS = {"nca": "nca_pair", "dpo": "sigmoid", "ipo": "ipo"}
MODES = ("kit", "kit_padded", "trl", "trl_gpu")


def use_trl_gpu_head() -> None:
    """TRL's fused head decides per call whether to score only the completion positions (``compact``) by
    ``_use_triton(device)``, true on CUDA/XPU only; make that decision as on a GPU. Only the name bound in
    ``trl.trainer.utils`` is replaced, so the tile kernel choice inside ``trl.kernels.chunked_logprob`` is unchanged."""
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_use_triton"):
        raise RuntimeError("this TRL version has no trl.trainer.utils._use_triton; the GPU-equivalent mode needs "
                           "updating for it")
    trl_utils._use_triton = lambda device: True


def tiny_llama(vocab_size: int, seed: int = 0):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from nca_kit.models import LoraSettings

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraSettings(r=16, lora_alpha=16, lora_dropout=0.0).to_peft())


def hh_pairs(tokenizer, n: int, max_length: int):
    """The first ``n`` HH-RLHF harmless test pairs that fit ``max_length`` tokens untruncated, as TRL's plain-text
    prompt / chosen / rejected (the prompt is the chat-template text with the generation prompt)."""
    import datasets

    from nca_kit.data import load_hh_rlhf

    rows = []
    for row in load_hh_rlhf(on_invalid="skip"):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        longest = max(len(tokenizer(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        if n_prompt + longest + 2 <= max_length:  # + EOS, + one token of slack for merges at the boundary
            rows.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
        if len(rows) == n:
            break
    return datasets.Dataset.from_list(rows)


class StepClock(TrainerCallback):
    """Timestamps of ``on_step_end`` and the logged losses."""

    def __init__(self):
        self.times, self.losses = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def worker(which: str, loss: str, args) -> dict:
    """One training run in this process; returns its timings, losses and peak RSS."""
    from trl import DPOConfig, DPOTrainer

    from bench_layouts import smollm2_tokenizer

    torch.set_num_threads(args.threads)
    trl_side = which.startswith("trl")
    if which == "trl_gpu":
        use_trl_gpu_head()
    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    pairs = hh_pairs(tokenizer, args.pairs, args.max_length)
    model = tiny_llama(len(tokenizer))
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
                  learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, seed=0, logging_steps=1,
                  report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                  # explicit for both sides: DPOConfig's own defaults are bf16=True and gradient_checkpointing=True
                  bf16=False, gradient_checkpointing=False)
    dpo_args = DPOConfig(**common, beta=0.1, loss_type=[TRL_LOSS[loss]], max_length=args.max_length,
                         precompute_ref_log_probs=trl_side)
    clock = StepClock()
    trl = DPOTrainer(model=model, args=dpo_args, train_dataset=pairs, processing_class=tokenizer, callbacks=[clock])
    if trl_side:
        trainer = trl
    else:
        from transformers import TrainingArguments

        from nca_kit.logps import RewardCollator
        from nca_kit.training import NCATrainer, TrainConfig

        tokenized = trl.train_dataset  # TRL's token ids, so both sides see identical sequences
        records = tokenized.map(lambda r: {"prompt_input_ids": r["prompt_ids"],
                                           "response_input_ids": [r["chosen_ids"], r["rejected_ids"]],
                                           "rewards": [1.0, 0.0]},
                                remove_columns=tokenized.column_names)
        del trl
        kit_args = TrainingArguments(**common, remove_unused_columns=False, train_sampling_strategy="random")
        trainer = NCATrainer(model=model, args=kit_args, data_collator=RewardCollator(tokenizer.pad_token_id),
                             train_dataset=records, callbacks=[clock], loss_type=loss, beta=0.1, pairwise=True,
                             average_logps=(loss == "ipo"),
                             logps_forward="padded" if which == "kit_padded" else TrainConfig.logps_forward)
        trainer.train_dataset = trainer.precompute_reference_logps(records)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steps = clock.times
    timed = steps[-1] - steps[0]  # the steps after the first
    return {"which": which, "loss": loss, "examples_per_s": args.batch * (len(steps) - 1) / timed,
            "train_wall_s": wall, "losses": clock.losses,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=["nca", "dpo", "ipo"], choices=sorted(TRL_LOSS))
    parser.add_argument("--repeats", type=int, default=3, help="rotated runs per mode and loss")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--worker", nargs=2, metavar=("WHICH", "LOSS"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return {}

    passthrough = [f"--pairs={args.pairs}", f"--batch={args.batch}", f"--steps={args.steps}",
                   f"--max-length={args.max_length}", f"--threads={args.threads}"]
    runs: dict = {}
    modes = list(args.modes)
    for loss in args.losses:
        for rep in range(args.repeats):
            shift = rep % len(modes)
            for which in modes[shift:] + modes[:shift]:  # rotated per repeat: no mode always runs first
                out = subprocess.run([sys.executable, __file__, "--worker", which, loss, *passthrough],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{which}/{loss} failed:\n{out.stderr[-3000:]}")
                run = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(loss, {}).setdefault(which, []).append(run)
                print(f"{loss:4s} {which:10s} run {rep + 1}: {run['examples_per_s']:.2f} examples/s, "
                      f"peak RSS {run['peak_rss_gib']:.2f} GiB, first losses "
                      f"{', '.join(f'{x:.6f}' for x in run['losses'][:3])}", flush=True)
    pairs = [(k, t) for k in ("kit", "kit_padded") for t in ("trl_gpu", "trl") if k in modes and t in modes]
    print("\n| loss (TRL name) | kit mode / TRL mode | examples/s ratio (min / median) | peak RSS ratio (median) | "
          "max |loss diff|, first 3 steps |")
    print("|---|---|---|---|---|")
    summary: dict = {}
    for loss, by in runs.items():
        for kit_mode, trl_mode in pairs:
            kit, trl = by[kit_mode], by[trl_mode]
            speed = [k["examples_per_s"] / t["examples_per_s"] for k, t in zip(kit, trl)]
            rss = statistics.median(k["peak_rss_gib"] for k in kit) / statistics.median(t["peak_rss_gib"] for t in trl)
            diff = max(abs(a - b) for k, t in zip(kit, trl) for a, b in zip(k["losses"][:3], t["losses"][:3]))
            summary.setdefault(loss, {})[f"{kit_mode}/{trl_mode}"] = {
                "speed_ratio_min": min(speed), "speed_ratio_median": statistics.median(speed), "rss_ratio": rss,
                "max_loss_diff_first_3": diff}
            print(f"| {loss} ({TRL_LOSS[loss]}) | {kit_mode} / {trl_mode} | {min(speed):.2f}x / "
                  f"{statistics.median(speed):.2f}x | {rss:.2f}x | {diff:.1e} |", flush=True)
        summary[loss]["examples_per_s_median"] = {m: statistics.median(r["examples_per_s"] for r in by[m])
                                                  for m in modes}
    print("\ntrl_gpu is what a GPU user of TRL gets (completion positions only); trl is TRL's CPU fallback.")
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("json", "worker")}, "runs": runs,
              "summary": summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
