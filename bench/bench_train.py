"""Training-step benchmark of the kit, measured side by side in one run.

Reports, for one model shape:

1. **ceiling** – the raw model's forward + backward with the plain causal-LM loss (full logits) on the same tokens;
2. **kit step (cached reference)** – ``NCATrainer.training_step`` (selective-logits log-probs + NCA loss + backward)
   with reference log-probs precomputed, as training runs by default;
3. **kit step (per-step reference)** – the same with the reference forward (adapters disabled) in every step;
4. **peak memory** of one prompt with K = 4 responses of full length (CUDA: ``max_memory_allocated``);
5. **length grouping** – non-pad tokens/s of kit steps over a dataset with an UltraFeedback-like length
   distribution, batched in random order (naive padding) vs by ``transformers``' ``LengthGroupedSampler`` (what
   ``TrainConfig.group_by_length=True`` uses).

Targets from the project's issue tracker (GPU, Mistral-7B shape, 4-bit + LoRA r=16): kit >= 0.9x ceiling;
caching >= 1.2x; peak <= 12 GiB for one prompt with K=4 at 1024 tokens; grouping >= 1.3x non-pad tokens/s.

    python bench/bench_train.py                       # CPU: a small random Llama, shorter sequences
    python bench/bench_train.py --shape mistral-7b    # CUDA: Mistral-7B shape, random weights, 4-bit + LoRA
    python bench/bench_train.py --json runs/bench.json

No weights are downloaded: the model is built from a config with random weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # name: (config kwargs, default sequence length)
    "small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8192), 256),
    "mistral-7b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=32000, sliding_window=None), 1024),
}


def build_model(shape: str, device: torch.device, quantize_4bit: bool, lora_r: int):
    """A random-weight model of the given shape, with LoRA (and 4-bit base on CUDA) through nca_kit.models."""
    from transformers import MistralConfig, MistralForCausalLM

    from nca_kit.models import LoraSettings, load_model

    kwargs, _ = SHAPES[shape]
    config = MistralConfig(max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False, **kwargs)
    lora = LoraSettings(r=lora_r, lora_alpha=lora_r, lora_dropout=0.05)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = MistralForCausalLM(config).to(dtype)
        model.save_pretrained(folder, safe_serialization=True)
        del model
        _write_tokenizer(folder, config.vocab_size)
        model, _ = load_model(folder, device=device, quantize_4bit=quantize_4bit, lora=lora,
                              gradient_checkpointing=quantize_4bit, dtype=dtype)
    return model


def _write_tokenizer(folder: str, vocab_size: int) -> None:
    from nca_kit.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)


def make_record(prompt_len: int, response_lens: list[int], vocab: int, gen: torch.Generator) -> dict:
    ids = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
    return {
        "prompt_input_ids": ids(prompt_len),
        "response_input_ids": [ids(n) for n in response_lens],
        "rewards": [float(k) for k in range(len(response_lens), 0, -1)],
    }


def ultrafeedback_like_lengths(n: int, max_length: int, seed: int) -> list[tuple[int, list[int]]]:
    """Prompt and K=4 response lengths with an UltraFeedback-like shape: log-normal, heavy right tail, capped.

    Prompts: median ~10% of ``max_length`` (short instructions, a long tail of pasted context). Responses: a
    per-prompt scale (median ~25% of ``max_length``; a coding task draws long answers from every model, a yes/no
    question short ones) times a per-response factor (models differ in verbosity). The shape, not the exact numbers,
    is what matters for padding.
    """
    gen = torch.Generator().manual_seed(seed)
    normal = lambda: torch.randn(1, generator=gen).item()  # noqa: E731
    out = []
    for _ in range(n):
        p = int(min(max_length // 2, max(8, 0.10 * max_length * math.exp(0.9 * normal()))))
        scale = 0.25 * max_length * math.exp(0.6 * normal())
        rs = [int(min(max_length - p, max(4, scale * math.exp(0.4 * normal())))) for _ in range(4)]
        out.append((p, rs))
    return out


def timed_round_robin(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Time several functions in interleaved rounds (A B C A B C ...), so machine-load drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def make_trainer(model, collator, loss_type: str):
    from transformers import TrainingArguments

    from nca_kit.training import NCATrainer

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, report_to="none",
                             remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
                             bf16=torch.cuda.is_available(), disable_tqdm=True)
    trainer = NCATrainer(model=model, args=args, data_collator=collator, loss_type=loss_type, alpha=0.01, beta=0.01)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step directly
    return trainer


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: mistral-7b on CUDA, small on CPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="prompt + response tokens (default: per shape)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: seq_len // 8)")
    parser.add_argument("--batch-prompts", type=int, default=2, help="prompts per step (x K=4 sequences)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grouping-prompts", type=int, default=32, help="dataset size for the grouping benchmark")
    parser.add_argument("--grouping-rounds", type=int, default=2, help="interleaved epochs per batching order")
    parser.add_argument("--no-4bit", action="store_true", help="keep the base weights in bf16 on CUDA")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--loss", default="nca")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from transformers.trainer_pt_utils import LengthGroupedSampler

    from nca_kit.logps import RewardCollator, padded_length

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = args.shape or ("mistral-7b" if cuda else "small")
    seq_len = args.seq_len or SHAPES[shape][1]
    prompt_len = args.prompt_len or seq_len // 8
    quantize = cuda and not args.no_4bit
    if shape == "mistral-7b" and not cuda:
        sys.exit("the mistral-7b shape needs a CUDA GPU (28 GB of fp32 weights on CPU); use --shape small")
    torch.set_num_threads(torch.get_num_threads())
    vocab = SHAPES[shape][0]["vocab_size"]

    print(f"# nca-kit training-step benchmark: shape={shape} device={device} 4bit={quantize} "
          f"seq_len={seq_len} prompt_len={prompt_len} K=4 batch_prompts={args.batch_prompts}", flush=True)
    t0 = time.perf_counter()
    model = build_model(shape, device, quantize, args.lora_r)
    model.train()
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    collator = RewardCollator(pad_token_id=0)
    trainer = make_trainer(model, collator, args.loss)
    gen = torch.Generator().manual_seed(0)
    resp = seq_len - prompt_len

    # -- 1-3: ceiling vs kit step, cached vs per-step reference -------------------------------------------------
    records = [make_record(prompt_len, [resp] * 4, vocab, gen) for _ in range(args.batch_prompts)]
    batch = to_device(collator(records), device)
    n_tokens = int(batch["attention_mask"].sum())

    def raw_step():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        from nca_kit.logps import reference_logps

        cached = dict(batch, reference_logps=reference_logps(model, batch).float())

    def kit_step(inputs):
        trainer.training_step(model, inputs)
        model.zero_grad(set_to_none=True)

    results: dict = {"shape": shape, "device": str(device), "device_name": _device_name(device),
                     "four_bit": quantize, "seq_len": seq_len, "prompt_len": prompt_len,
                     "sequences_per_step": int(batch["input_ids"].shape[0]), "tokens_per_step": n_tokens,
                     "torch": torch.__version__, "python": platform.python_version()}
    fns = {"ceiling (raw forward+backward)": raw_step,
           "kit step, cached reference": lambda: kit_step(cached),
           "kit step, per-step reference": lambda: kit_step(batch)}
    rows = []
    for name, times in timed_round_robin(fns, args.repeats, args.warmup, device).items():
        med = statistics.median(times)
        rows.append((name, med, n_tokens / med))
        print(f"{name:34s} median {med * 1e3:9.1f} ms   {n_tokens / med:10.0f} tokens/s "
              f"(spread {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} ms)", flush=True)
    ceiling, cached_t, per_step_t = rows[0][1], rows[1][1], rows[2][1]
    results.update(ceiling_tokens_per_s=rows[0][2], kit_cached_tokens_per_s=rows[1][2],
                   kit_per_step_tokens_per_s=rows[2][2], kit_vs_ceiling=ceiling / cached_t,
                   caching_speedup=per_step_t / cached_t)

    # -- 4: peak memory, one prompt with K=4 full-length responses -------------------------------------------------
    one = to_device(collator([make_record(prompt_len, [resp] * 4, vocab, gen)]), device)
    with torch.no_grad():
        one["reference_logps"] = reference_logps(model, one).float()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        kit_step(one)
        torch.cuda.synchronize()
        results["peak_memory_gib_one_prompt_k4"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        kit_step(one)
        results["peak_rss_gib_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del one

    # -- 5: length grouping vs naive padding ------------------------------------------------------------------------
    lengths = ultrafeedback_like_lengths(args.grouping_prompts, seq_len, seed=1)
    dataset = [make_record(p, rs, vocab, gen) for p, rs in lengths]
    for rec in dataset:
        with torch.no_grad():
            rec["reference_logps"] = [0.0] * 4  # values do not matter for speed; the cached path is what trains
    total = [padded_length(r["prompt_input_ids"], r["response_input_ids"]) for r in dataset]
    bp = args.batch_prompts
    naive_order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(2)).tolist()
    grouped_order = list(LengthGroupedSampler(bp, lengths=total, generator=torch.Generator().manual_seed(2)))
    epochs = {}
    for key, order in [("naive", naive_order), ("grouped", grouped_order)]:
        batches = [to_device(collator([dataset[i] for i in order[s:s + bp]]), device)
                   for s in range(0, len(order), bp)]
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        results[f"{key}_padding_fraction"] = 1 - real / padded
        epochs[key] = (batches, real)
    # The floor no batching order can beat: one prompt per batch still pads its K responses to the longest one.
    singles = [collator([rec])["attention_mask"] for rec in dataset]
    results["padding_fraction_floor"] = 1 - sum(int(m.sum()) for m in singles) / sum(m.numel() for m in singles)
    results["grouping_speedup_bound"] = (1 - results["padding_fraction_floor"]) / (1 - results["naive_padding_fraction"])
    epoch_times = timed_round_robin(
        {key: (lambda bs=batches: [kit_step(b) for b in bs]) for key, (batches, _) in epochs.items()},
        repeats=args.grouping_rounds, warmup=0, device=device)
    for key, label in [("naive", "naive padding (random batches)"), ("grouped", "length-grouped batches")]:
        dt = statistics.median(epoch_times[key])
        real = epochs[key][1]
        results[f"{key}_nonpad_tokens_per_s"] = real / dt
        print(f"{label:34s} {real / dt:10.0f} non-pad tokens/s   padding "
              f"{100 * results[f'{key}_padding_fraction']:5.1f}% ({len(epochs[key][0])} steps, median {dt:.1f} s "
              f"over {args.grouping_rounds} interleaved epochs)", flush=True)
    results["grouping_speedup"] = results["grouped_nonpad_tokens_per_s"] / results["naive_nonpad_tokens_per_s"]
    print(f"{'padding floor (1 prompt per batch)':34s} {'':10s}                  padding "
          f"{100 * results['padding_fraction_floor']:5.1f}% -> no batching order beats "
          f"{results['grouping_speedup_bound']:.2f}x over naive (the K responses of a prompt differ in length)")

    print("\n| measure | value | target (GPU, Mistral-7B shape) |")
    print("|---|---|---|")
    print(f"| kit step / raw forward+backward ceiling | {results['kit_vs_ceiling']:.2f}x | >= 0.9x |")
    print(f"| speed-up from cached reference log-probs | {results['caching_speedup']:.2f}x | >= 1.2x |")
    if cuda:
        print(f"| peak memory, 1 prompt x K=4 x {seq_len} tokens | "
              f"{results['peak_memory_gib_one_prompt_k4']:.2f} GiB | <= 12 GiB |")
    else:
        print(f"| peak process RSS (CPU, whole run) | {results['peak_rss_gib_process']:.2f} GiB | (GPU target: <= 12 GiB) |")
    print(f"| non-pad tokens/s, grouped / naive | {results['grouping_speedup']:.2f}x | >= 1.3x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
