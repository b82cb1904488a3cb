"""FLR scoring speed: prefix-shared vs naive, measured side by side in one run on SmolLM2-135M-Instruct.

Each response is scored under 2 x (follow-ups per polarity) continuations that share the prefix prompt + response.
The naive path runs every full conversation (prefix + follow-up turn) through the model. Two prefix-shared layouts
(``nca_kit.rewards.followup.prefix_shared_logps``): ``cache`` encodes the prefixes once and runs all follow-up turns
from their key/value cache expanded over the batch; ``tree`` (the default on CPU) puts a response's prefix and all
its follow-up turns into one row under a tree attention mask (``nca_kit.packing.tree_states``). All score the same
responses with the same follow-ups; the paths run in turn, ``--repeats`` rounds, and the script reports the median
responses/s of each, the ratios to naive, and checks that every score agrees with naive to ``--atol``.
Target: tree (the default) >= 5x naive on the CPU with 60+ follow-ups.

    python bench/bench_flr.py                          # 8 HH-RLHF responses, all 120 default follow-ups
    python bench/bench_flr.py --responses 4 --categories correctness relevance understanding   # 60 follow-ups
    python bench/bench_flr.py --json runs/bench_flr.json

Responses are HH-RLHF harmless-base test pairs when the local file is there (``nca_kit.data.load_hh_rlhf``), else the
repository's three-pair sample ``data/hh_rlhf_sample.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def responses(n: int, seed: int) -> tuple[list, list[str], str]:
    from nca_kit.data import hh_rlhf_local_path, load_hh_rlhf

    path = hh_rlhf_local_path()
    source = "HH-RLHF harmless-base test" if path is not None else "data/hh_rlhf_sample.jsonl"
    ds = load_hh_rlhf(path if path is not None else REPO / "data" / "hh_rlhf_sample.jsonl", on_invalid="skip")
    rows = ds.shuffle(seed=seed).select(range(min(len(ds), (n + 1) // 2)))
    prompts = [r["prompt"] for r in rows for _ in range(2)][:n]
    texts = [t for r in rows for t in (r["chosen"], r["rejected"])][:n]
    return prompts, texts, source


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    from nca_kit.models import load_smollm2
    from nca_kit.data import as_messages
    from nca_kit.rewards import followup as flr
    from nca_kit.rewards import followup_texts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=8, help="responses scored by each path")
    parser.add_argument("--categories", nargs="*", default=None, help="follow-up categories (default: all six)")
    parser.add_argument("--batch-size", type=int, default=64, help="continuations per forward (both paths)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="which HH pairs")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed difference between the paths")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of naive, cache, tree (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    prompts, texts, source = responses(args.responses, args.seed)
    n_followups = len(followup_texts.flatten_followups(followup_texts.load_followups(None, args.categories)))
    kwargs = dict(categories=args.categories, batch_size=args.batch_size, progress=False)
    paths = {"naive": dict(share_prefix=False), "cache": dict(layout="cache"), "tree": dict(layout="tree")}
    for options in paths.values():  # warm-up (allocator, kernels)
        flr.flr_scores(model, tokenizer, prompts[:1], texts[:1], **kwargs, **options)
    times = {name: [] for name in paths}
    scores = {}
    for _ in range(args.repeats):
        for name, options in paths.items():
            scores[name], t = timed(lambda: flr.flr_scores(model, tokenizer, prompts, texts, **kwargs, **options))
            times[name].append(t)
    median = {name: float(np.median(t)) for name, t in times.items()}
    naive = scores["naive"]
    diff = {name: max(float(np.abs(s.loglik - naive.loglik).max()), float(np.abs(s.logit - naive.logit).max()))
            for name, s in scores.items()}
    reward_diff = max(float(np.abs(s.rewards(v) - naive.rewards(v)).max()) for s in scores.values()
                      for v in flr.VARIANTS)
    prefix_tokens = [len(followup_texts.conversation_prefix(tokenizer, as_messages(p), r, 1024))
                     for p, r in zip(prompts, texts)]
    result = {
        "model": "SmolLM2-135M-Instruct (offline GGUF, float32)",
        "device": f"cpu, {args.threads} threads ({platform.processor() or platform.machine()})",
        "responses": len(texts), "source": source, "followups": n_followups,
        "mean_prefix_tokens": float(np.mean(prefix_tokens)), "batch_size": args.batch_size, "repeats": args.repeats,
        **{f"{name}_responses_per_s": len(texts) / t for name, t in median.items()},
        "speedup_cache": median["naive"] / median["cache"], "speedup_tree": median["naive"] / median["tree"],
        "speedup": median["naive"] / median["tree"],
        "seconds": times, "max_abs_score_diff": max(diff.values()), "max_abs_reward_diff": reward_diff,
    }
    for key, value in result.items():
        if key != "seconds":
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if max(diff.values()) > args.atol:
        print(f"FAIL: a prefix-shared path differs from naive by {max(diff.values()):.2e} > {args.atol:.0e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
