#!/usr/bin/env python
"""A synthetic reward dataset with UltraFeedback's shape, at the paper's size, for scale tests of the data pipeline.

61,135 prompts x K = 4 responses with scores, written in the layout of the NCA authors' K = 4 UltraFeedback release
(``prompt``, ``A0..A3`` = [user, assistant] message lists, ``score_A0..score_A3``), so it goes through the same
adapter (:func:`nca_kit.data.load_reward_dataset`, layout ``nca_reward``) as the real data would.

Lengths follow an UltraFeedback-like shape (the same log-normal model as ``bench/bench_train.py``): short
instructions with a long tail of pasted context, and a per-prompt response scale (a coding task draws long answers
from every model) with per-response spread; measured in words of a fixed vocabulary (about 1.3 tokens per word with
the kit's tokenizers). Scores are GPT-4-like ratings in [1, 10] in steps of 0.5. The text is meaningless: this file
tests memory and time, not learning.

    python bench/synthetic_ultrafeedback.py --prompts 61135 --out runs/synthetic_uf_61135.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import time
from pathlib import Path

from tqdm.auto import tqdm

UF_PROMPTS = 61_135  # UltraFeedback prompts in the paper's K = 4 release (Appendix C)
K = 4
_WORDS = ("the model answer data reward policy value train token step learn align prompt response score human "
          "feedback noise contrast sample label batch loss gradient update likely better worse explain code list "
          "number python function return first second because therefore however example question").split()


def ultrafeedback_like_word_lengths(rng: random.Random, max_words: int = 780) -> tuple[int, list[int]]:
    """One prompt's word count and its K response word counts (log-normal, heavy right tail, capped)."""
    prompt = int(min(max_words // 2, max(4, 0.10 * max_words * math.exp(0.9 * rng.gauss(0, 1)))))
    scale = 0.25 * max_words * math.exp(0.6 * rng.gauss(0, 1))
    responses = [int(min(max_words - prompt, max(3, scale * math.exp(0.4 * rng.gauss(0, 1))))) for _ in range(K)]
    return prompt, responses


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n_words))


def synthetic_rows(n_prompts: int, seed: int = 0):
    """Yield ``n_prompts`` rows in the ``nca_reward`` layout, deterministically for a given seed."""
    rng = random.Random(seed)
    for i in range(n_prompts):
        n_prompt, n_responses = ultrafeedback_like_word_lengths(rng)
        prompt = f"[{i}] " + _text(rng, n_prompt)  # the index keeps prompts distinct
        row = {"prompt": prompt, "prompt_id": f"synthetic-{i}"}
        for k, n in enumerate(n_responses):
            row[f"A{k}"] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(rng, n)}]
            row[f"score_A{k}"] = rng.randint(2, 20) / 2
        yield row


def write_synthetic_ultrafeedback(path: str | Path, n_prompts: int = UF_PROMPTS, seed: int = 0,
                                  progress: bool = True) -> Path:
    """Write ``n_prompts`` rows as JSON lines (gzip if ``path`` ends in ``.gz``), streaming: memory stays flat."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for row in tqdm(synthetic_rows(n_prompts, seed), total=n_prompts, desc="synthetic UltraFeedback",
                        unit="prompt", disable=not progress):
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=UF_PROMPTS, help="number of prompts (paper: 61,135)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output .jsonl or .jsonl.gz (default runs/synthetic_uf_N.jsonl.gz)")
    args = parser.parse_args(argv)
    out = args.out or f"runs/synthetic_uf_{args.prompts}.jsonl.gz"
    start = time.perf_counter()
    path = write_synthetic_ultrafeedback(out, args.prompts, args.seed)
    print(f"wrote {args.prompts} prompts x {K} responses to {path} ({path.stat().st_size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
