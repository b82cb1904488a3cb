"""Forward layouts of the training step, measured side by side: padded, packed (no padding), shared prompt, tree, auto.

Two parts, both timing ``NCATrainer.training_step`` (selective log-probs + NCA loss + backward, cached reference)
on the small random model of ``bench/bench_train.py`` (LoRA r = 16), in interleaved rounds so machine-load drift
hits every variant alike; each ratio is computed per round and reported as min / median over the rounds.

1. **Length distributions.** HH-RLHF harmless test pairs (real; long multi-turn prompts, K = 2), tokenized with
   SmolLM2's tokenizer and the kit's truncation, token ids folded into the model's vocabulary; and K = 4 records
   with UltraFeedback-like lengths (the log-normal model of ``bench/bench_train.py`` and
   ``bench/synthetic_ultrafeedback.py``, scaled to ``--max-length``: short prompts, responses of different lengths).
   One epoch per variant: random batches (naive) or length-grouped batches, each with the padded, packed,
   shared-prompt (prompt keys/values expanded over its K responses) or tree (prompt and its K responses in one row
   under a tree attention mask) forward, or ``auto`` (per batch the cheapest of padded, packed and tree by
   estimated FLOPs, ``nca_kit.packing.choose_layout``). Reported: non-pad tokens/s over naive padding, and the activations saved for backward on
   the epoch's largest batch (MiB, summed over the tensors autograd keeps; on CUDA also the peak allocated memory).
2. **Prompt sharing vs prompt/response length and K.** Synthetic prompts of ``P`` tokens with ``K`` responses of
   ``R`` tokens each (equal lengths, so there is no padding to remove and packing equals padding): speed-up of the
   shared-prompt and tree forwards over the padded one.

    python bench/bench_layouts.py                 # both parts, ~10 min on 2 CPU cores
    python bench/bench_layouts.py --json runs/layouts.json

No weights are downloaded: the model has random weights; the tokenizer is the offline SmolLM2 one.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402
    SHAPES, build_model, make_record, make_trainer, timed_round_robin, to_device, ultrafeedback_like_lengths,
)

LAYOUTS = ("padded", "packed", "shared_prompt", "tree", "auto")
SHARING = ("shared_prompt", "tree", "auto")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from nca_kit.models import SMOLLM2_CHAT_TEMPLATE, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = tokenizer.chat_template or SMOLLM2_CHAT_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def records_of(source: str, n: int, vocab: int, max_prompt_length: int, max_length: int, seed: int) -> list[dict]:
    """``n`` tokenized records: HH-RLHF (``"hh"``, ids folded into ``vocab``) or UltraFeedback-like lengths
    (``"uf"``, random ids)."""
    if source == "uf":
        gen = torch.Generator().manual_seed(seed)
        return [make_record(p, rs, vocab, gen) | {"reference_logps": [0.0] * 4, "length": p + max(rs)}
                for p, rs in ultrafeedback_like_lengths(n, max_length, seed)]
    from nca_kit.data import load_hh_rlhf
    from nca_kit.logps import tokenize_reward_dataset

    rows = load_hh_rlhf(on_invalid="skip")
    rows = rows.select(sorted(random.Random(seed).sample(range(len(rows)), n)))
    tokenized = tokenize_reward_dataset(rows, smollm2_tokenizer(), max_prompt_length=max_prompt_length,
                                        max_length=max_length, overflow="skip")
    return [{"prompt_input_ids": [i % vocab for i in r["prompt_input_ids"]],
             "response_input_ids": [[i % vocab for i in y] for y in r["response_input_ids"]],
             "rewards": r["rewards"], "reference_logps": [0.0] * len(r["rewards"]), "length": r["length"]}
            for r in tokenized]


def saved_activation_mib(step) -> float:
    """MiB of the tensors autograd saves for backward during ``step()`` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def ratios(times: dict[str, list[float]], base: str, work: dict[str, float] | None = None) -> dict[str, dict]:
    """Per-round speed-up of every variant over ``base`` (equal work unless ``work`` says otherwise): min, median."""
    out = {}
    for name, ts in times.items():
        per_round = [tb / t for tb, t in zip(times[base], ts)]
        out[name] = {"min": min(per_round), "median": statistics.median(per_round),
                     "median_s": statistics.median(ts)}
    return out


def part_real(trainer, model, collator, device, source, args, vocab) -> dict:
    records = records_of(source, args.prompts, vocab, args.max_prompt_length, args.max_length, seed=1)
    from transformers.trainer_pt_utils import LengthGroupedSampler

    bp = args.batch_prompts
    orders = {"random": torch.randperm(len(records), generator=torch.Generator().manual_seed(2)).tolist(),
              "grouped": list(LengthGroupedSampler(bp, lengths=[r["length"] for r in records],
                                                   generator=torch.Generator().manual_seed(2)))}
    epochs, fns = {}, {}
    for order_name, order in orders.items():
        batches = [to_device(collator([records[i] for i in order[s:s + bp]]), device)
                   for s in range(0, len(order), bp)]
        epochs[order_name] = batches
        for layout in LAYOUTS:
            fns[f"{order_name}/{layout}"] = (lambda bs=batches, lay=layout: run_epoch(trainer, model, bs, lay))
    real = sum(int(b["attention_mask"].sum()) for b in epochs["random"])
    padded = {o: sum(b["attention_mask"].numel() for b in bs) for o, bs in epochs.items()}
    prompt = sum(len(r["prompt_input_ids"]) for r in records)
    for layout in LAYOUTS:  # warm-up: one step of each layout
        run_epoch(trainer, model, epochs["random"][:1], layout)
    times = timed_round_robin(fns, repeats=args.repeats, warmup=0, device=device)
    result = {"prompts": len(records), "non_pad_tokens": real, "prompt_tokens": prompt,
              "padding_fraction": {o: 1 - real / p for o, p in padded.items()},
              "speedup_vs_naive": ratios(times, "random/padded")}
    largest = max(epochs["random"], key=lambda b: b["attention_mask"].numel())
    result["saved_activations_mib_largest_batch"] = {
        layout: saved_activation_mib(lambda lay=layout: run_epoch(trainer, model, [largest], lay))
        for layout in LAYOUTS}
    if device.type == "cuda":
        peaks = {}
        for layout in LAYOUTS:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run_epoch(trainer, model, [largest], layout)
            peaks[layout] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_memory_gib_largest_batch"] = peaks
    print(f"\n## {source}: {len(records)} prompts, {real} non-pad tokens ({100 * prompt / real:.0f}% of them "
          f"prompt tokens counted once per response), padding {100 * result['padding_fraction']['random']:.1f}% "
          f"random / {100 * result['padding_fraction']['grouped']:.1f}% grouped", flush=True)
    print("| batches | forward | non-pad tokens/s vs naive (min / median of rounds) | saved activations, largest "
          "batch |")
    print("|---|---|---|---|")
    for name, r in result["speedup_vs_naive"].items():
        order, layout = name.split("/")
        mib = result["saved_activations_mib_largest_batch"][layout] if order == "random" else None
        print(f"| {order} | {layout} | {r['min']:.2f}x / {r['median']:.2f}x | "
              f"{f'{mib:.0f} MiB' if mib is not None else ''} |", flush=True)
    return result


def run_epoch(trainer, model, batches, layout):
    trainer.logps_forward = layout
    for b in batches:
        trainer.training_step(model, b)
        model.zero_grad(set_to_none=True)


def part_sweep(trainer, model, collator, device, args, vocab) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    rows = []
    print("\n## prompt sharing vs padded: P prompt tokens, K responses of R tokens, "
          f"{args.sweep_prompts} prompts per step")
    print("| P | R | P/R | K | shared-prompt speed-up (min / median) | tree speed-up (min / median) "
          "| auto speed-up (min / median) | tokens run, shared / padded |")
    print("|---|---|---|---|---|---|---|---|")
    for p, r in args.sweep_lengths:
        for k in args.sweep_k:
            batch = to_device(collator([make_record(p, [r] * k, vocab, gen) | {"reference_logps": [0.0] * k}
                                        for _ in range(args.sweep_prompts)]), device)
            fns = {layout: (lambda lay=layout: run_epoch(trainer, model, [batch], lay))
                   for layout in ("padded",) + SHARING}
            times = timed_round_robin(fns, repeats=args.repeats, warmup=1, device=device)
            speed = ratios(times, "padded")
            token_ratio = (p + k * r) / (k * (p + r))
            rows.append({"prompt_len": p, "response_len": r, "k": k, "speedup": speed["shared_prompt"],
                         "speedup_tree": speed["tree"], "speedup_auto": speed["auto"], "token_ratio": token_ratio})
            cells = " | ".join(f"{speed[lay]['min']:.2f}x / {speed[lay]['median']:.2f}x" for lay in SHARING)
            print(f"| {p} | {r} | {p / r:.2f} | {k} | {cells} | {token_ratio:.2f} |", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["hh", "uf", "sweep"], choices=["hh", "uf", "sweep"])
    parser.add_argument("--prompts", type=int, default=48, help="prompts per real-length epoch")
    parser.add_argument("--batch-prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3 for min / median)")
    parser.add_argument("--sweep-lengths", type=lambda s: [tuple(map(int, x.split(":"))) for x in s.split(",")],
                        default=[(32, 224), (128, 128), (224, 32)], help="P:R pairs, comma-separated")
    parser.add_argument("--sweep-k", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    parser.add_argument("--sweep-prompts", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from nca_kit.logps import RewardCollator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model("small", device, quantize_4bit=False, lora_r=16)
    model.train()
    collator = RewardCollator(pad_token_id=0)
    trainer = make_trainer(model, collator, "nca")
    vocab = SHAPES["small"][0]["vocab_size"]
    print(f"# forward layouts: small random Mistral shape, LoRA r=16, device={device}, "
          f"max_length={args.max_length}, torch threads={torch.get_num_threads()}", flush=True)
    start = time.perf_counter()
    results: dict = {"device": str(device), "args": {k: v for k, v in vars(args).items() if k != "json"}}
    for source in ("hh", "uf"):
        if source in args.parts:
            results[source] = part_real(trainer, model, collator, device, source, args, vocab)
    if "sweep" in args.parts:
        results["sweep"] = part_sweep(trainer, model, collator, device, args, vocab)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
