"""Headline evaluation of Follow-up Likelihood as Reward (FLR) and its Direct baseline with SmolLM2-135M-Instruct.

1. **HH-RLHF harmless-base test pairs** (a fixed seeded subset of ``--pairs``): pairwise accuracy of Direct and of FLR
   (variants ``paper``, ``code`` and ``code_literal``; all six categories together and each alone) with 95 % Wilson
   intervals, each variant minus Direct with a paired bootstrap interval, and how much the variants disagree.
2. **The kit's arithmetic K = 4 data** (``data/``, rubric rewards 0-10): per-prompt Spearman with the rubric, pairwise
   accuracy on pairs with different rubric rewards and on correct-vs-wrong pairs, Best-of-4 rubric reward; FLR with
   the arithmetic correctness follow-ups (every variant) and Direct. Runs first (it has a fixed size).

HH pairs are added 16 at a time (a fixed seeded order) until ``--minutes`` have passed since the start or ``--pairs``
are scored. Writes ``results.json`` (the tables and every HH response's reward, from which
``python -m nca_kit.report`` rebuilds the FLR tables of ``docs/results_rewards.md`` with the paired
comparisons and draws the figures ``rewards_flr_hh_accuracy.png``, ``rewards_flr_hh_distributions.png`` and
``rewards_flr_arith.png``), ``hh_table.csv`` and ``arith_table.csv`` into ``--out``; with ``--figures`` it also draws
the figures there itself.
Scores are cached in ``--cache`` block by block: an interrupted run resumes where it stopped, a rerun is instant.

    python scripts/flr_eval.py --pairs 128 --minutes 600 --arith-prompts 48 --out results/flr_eval
    python -m nca_kit.report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STEP = 16  # pairs per cache block (32 responses)


def main(argv=None) -> int:
    from nca_kit.models import load_model
    from nca_kit.rewards import studies

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="nca_kit.models.load_model name")
    parser.add_argument("--pairs", type=int, default=2308, help="most HH-RLHF pairs (a seeded subset; 0 skips HH)")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="time budget: HH pairs are added 16 at a time until it is spent")
    parser.add_argument("--seed", type=int, default=0, help="which HH pairs")
    parser.add_argument("--arith-prompts", type=int, default=48, help="arithmetic prompts (K = 4 each; 0 skips)")
    parser.add_argument("--batch-size", type=int, default=64, help="FLR continuations per forward pass")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=None, help="score cache folder (default: NCA_KIT_CACHE or runs/cache)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "flr_eval", help="tables and results.json")
    parser.add_argument("--figures", type=Path, default=None,
                        help="also draw the figures here (the docs' copies are drawn from results.json by "
                             "python -m nca_kit.report)")
    args = parser.parse_args(argv)
    if args.cache is None:
        from nca_kit.cache import default_cache_dir

        args.cache = default_cache_dir()

    start = time.time()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model, device="cpu")
    results: dict = {"model": args.model, "command": "python scripts/flr_eval.py " + " ".join(argv or sys.argv[1:])}

    if args.arith_prompts:
        arithmetic(args, model, tokenizer, results)
    if args.pairs:
        pairs = studies.hh_pairs(args.pairs, seed=args.seed)
        deadline = start + 60 * args.minutes
        for n in range(STEP, len(pairs) + STEP, STEP):  # grow by cache blocks until the time budget is spent
            n = min(n, len(pairs))
            sub = pairs.select(range(n))
            evaluation = studies.evaluate_pairs(model, tokenizer, sub["prompt"], sub["chosen"], sub["rejected"],
                                            batch_size=args.batch_size, cache_dir=args.cache, progress=False)
            print(f"{n} pairs scored after {(time.time() - start) / 60:.1f} min", flush=True)
            if time.time() > deadline:
                break
        table = evaluation.table()
        table.to_csv(args.out / "hh_table.csv", index=False)
        results["hh"] = {"n_pairs": evaluation.n, "seed": args.seed, "table": table.to_dict("records"),
                         "disagreement": evaluation.disagreement(),
                         # per response, chosen at even rows: what python -m nca_kit.report recomputes the tables from
                         "rewards": {f"{s} | {c}": [round(float(x), 6) for x in r]
                                     for (s, c), r in evaluation.scorers().items()}}
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        print(json.dumps(results["hh"]["disagreement"], indent=1))

    results["wall_seconds"] = round(time.time() - start, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wall time {results['wall_seconds']:.0f} s; results in {args.out / 'results.json'}")
    if args.figures is not None:  # the figures python -m nca_kit.report draws from the record, drawn here too
        from nca_kit.report import flr_figures

        args.figures.mkdir(parents=True, exist_ok=True)
        print("figures: " + ", ".join(str(p) for p in flr_figures(args.out / "results.json", args.figures)))
    return 0


def arithmetic(args, model, tokenizer, results: dict) -> None:
    """Part 2: FLR (arithmetic and helpfulness correctness follow-ups) and Direct against the rubric."""
    from nca_kit import generate
    from nca_kit.rewards import studies
    from nca_kit.tasks import CORRECT_THRESHOLD

    train = generate.load_or_generate(generate.GenerationSettings(), search_dirs=(REPO / "data",),
                                      verbose=False)["train"]
    train = train.select(range(min(args.arith_prompts, len(train))))
    table, _ = studies.evaluate_k_responses(model, tokenizer, train, followups="arithmetic",
                                        correct_threshold=CORRECT_THRESHOLD, batch_size=args.batch_size,
                                        cache_dir=args.cache)
    table.to_csv(args.out / "arith_table.csv", index=False)
    results["arith"] = {"n_prompts": len(train), "k": 4, "table": table.to_dict("records")}
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))


if __name__ == "__main__":
    sys.exit(main())
