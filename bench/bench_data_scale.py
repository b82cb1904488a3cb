#!/usr/bin/env python
"""Data at the paper's size: wall time and peak memory of each stage of the real pipeline, at several dataset sizes.

For every size a synthetic UltraFeedback-shaped reward dataset (``bench/synthetic_ultrafeedback.py``: N prompts x 4
responses in the ``nca_reward`` layout) goes through what ``python -m nca_kit.train`` does, with the tiny random
model: loading and validation (:func:`nca_kit.training.prepare_data`), tokenization with the paper's truncation
(prompt <= 512, prompt + response <= 1024 tokens), the cached reference pass
(:meth:`nca_kit.training.NCATrainer.precompute_reference_logps`, chunked and cached on disk), the same pass again (read
back from its cache, as a resumed or repeated run does), and the first training steps. Each size runs in a fresh
process (its own empty ``datasets`` cache), so the peak memory it reports belongs to that size alone. Two peaks per
stage, both cumulative (the peak up to the end of that stage): ``peak_rss_mib`` (``ru_maxrss``) counts every resident
page, including the pages of memory-mapped Arrow files that the kernel keeps in the page cache and can drop at any
time; ``peak_anon_mib`` (``RssAnon`` of ``/proc/self/status``, sampled every 20 ms) counts only the process's own
heap, which is what grows if the pipeline held the data set in Python objects or tensors. Flat memory means the
same anonymous peak at every size.

    python bench/bench_data_scale.py --sizes 5000 20000 61135           # table + runs/bench_data_scale/results.json
    python bench/bench_data_scale.py --sizes 5000 --max-prompts-reference 2000   # quicker: reference on 2,000 rows

``--max-prompts-reference`` limits the (model-bound) reference pass to the first rows, while loading and
tokenization still see the whole set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from synthetic_ultrafeedback import write_synthetic_ultrafeedback  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class AnonPeak:
    """The largest ``RssAnon`` (anonymous resident memory, MiB) seen by a sampling thread since it started."""

    def __init__(self, every: float = 0.02):
        import threading

        self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return float("nan")

    def _run(self, every: float):
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.read())

    def value(self) -> float:
        self.peak = max(self.peak, self.read())
        return self.peak


def one_size(data: Path, out: Path, steps: int, reference_rows: int | None, reference_batch: int,
             start: float) -> list[dict]:
    """Run the stages on one dataset file in this process; one ``{stage, seconds, peak_rss_mib, ...}`` per stage."""
    import torch
    from transformers import set_seed

    from nca_kit.logps import RewardCollator, tokenize_reward_dataset
    from nca_kit.training import NCATrainer, TrainConfig, build_training_arguments, prepare_data, prepare_model

    torch.set_num_threads(1)
    config = TrainConfig(model_name="tiny-mistral", dataset=str(data), dataset_layout="nca_reward",
                         loss_type="nca", beta=0.1, learning_rate=1e-3, max_steps=steps, batch_size=4,
                         per_device_batch_size=2, reference_batch_size=reference_batch, output_dir=str(out),
                         disable_tqdm=True, save_figure=False, warmup_ratio=0.0, seed=0)
    stages = []
    anon = AnonPeak()

    def stage(name, **extra):
        stages.append({"stage": name, "seconds": round(time.perf_counter() - start, 2),
                       "peak_rss_mib": round(peak_rss_mib(), 1), "peak_anon_mib": round(anon.value(), 1), **extra})
        print(json.dumps(stages[-1]), file=sys.stderr, flush=True)

    stage("imports")  # counted from the start of this process (see main)
    set_seed(config.seed)
    args = build_training_arguments(config)
    start = time.perf_counter()
    dataset, kind = prepare_data(config)
    stage("load + validate", rows=len(dataset))
    start = time.perf_counter()
    model, tokenizer, reference_model = prepare_model(config)
    tokenized = tokenize_reward_dataset(dataset, tokenizer, max_prompt_length=config.max_prompt_length,
                                        max_length=config.max_length, overflow="skip")
    stage("tokenize", rows=len(tokenized))
    trainer = NCATrainer(model=model, args=args, train_dataset=tokenized,
                         data_collator=RewardCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                         loss_type=config.loss_type, alpha=config.alpha, beta=config.beta)
    subset = tokenized.select(range(min(reference_rows or len(tokenized), len(tokenized))))
    for name in ("reference log-probs", "reference again (cache)"):
        start = time.perf_counter()
        with_reference = trainer.precompute_reference_logps(subset, config.reference_batch_size,
                                                            cache_dir=out / "reference_logps",
                                                            chunk_rows=config.reference_chunk_rows)
        stage(name, rows=len(with_reference))
    trainer.train_dataset = with_reference
    start = time.perf_counter()
    trainer.train()
    stage(f"first {steps} training steps")
    return stages


def main(argv=None) -> int:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 61135], help="numbers of prompts")
    parser.add_argument("--steps", type=int, default=3, help="training steps after the reference pass")
    parser.add_argument("--max-prompts-reference", type=int, default=None,
                        help="reference pass on the first N prompts only (default: all)")
    parser.add_argument("--reference-batch", type=int, default=4, help="prompts per forward of the reference pass")
    parser.add_argument("--out", default="runs/bench_data_scale")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one size
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.one is not None:
        stages = one_size(out / f"synthetic_uf_{args.one}.jsonl.gz", out / f"run_{args.one}", args.steps,
                          args.max_prompts_reference, args.reference_batch, start)
        print(json.dumps(stages))
        return 0

    results = {}
    for n in args.sizes:
        data = out / f"synthetic_uf_{n}.jsonl.gz"
        if not data.exists():
            write_synthetic_ultrafeedback(data, n)
        shutil.rmtree(out / f"run_{n}", ignore_errors=True)  # a fresh reference cache: the first pass is computed
        with tempfile.TemporaryDirectory() as hf_cache:  # a fresh datasets cache: loading is measured, not reused
            env = {**os.environ, "HF_DATASETS_CACHE": hf_cache, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            child = [sys.executable, __file__, "--one", str(n), "--out", str(out), "--steps", str(args.steps),
                     "--reference-batch", str(args.reference_batch)]
            if args.max_prompts_reference:
                child += ["--max-prompts-reference", str(args.max_prompts_reference)]
            done = subprocess.run(child, env=env, stdout=subprocess.PIPE, text=True, check=True)
        results[n] = json.loads(done.stdout.strip().splitlines()[-1])
        (out / "results.json").write_text(json.dumps(results, indent=1))

    names = [s["stage"] for s in next(iter(results.values()))]
    print("\n| stage | " + " | ".join(f"{n:,} prompts: s / peak anon MiB / peak RSS MiB" for n in results) + " |")
    print("|---|" + "---|" * len(results))
    for i, name in enumerate(names):
        cells = [f"{r[i]['seconds']:.1f} / {r[i]['peak_anon_mib']:.0f} / {r[i]['peak_rss_mib']:.0f}"
                 for r in results.values()]
        rows = {r[i].get("rows") for r in results.values()} - {None}
        print(f"| {name}{' (' + ', '.join(f'{x:,}' for x in sorted(rows)) + ' rows)' if rows else ''} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
