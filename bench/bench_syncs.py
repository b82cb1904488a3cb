"""Host synchronisations per training step, counted on the CPU.

A GPU step stalls whenever Python reads a tensor's value: ``.item()``, ``.tolist()``, ``bool()``, ``int()``,
``float()``, ``__index__``, ``nonzero`` (its result size) and ``.cpu()``/``.numpy()``. This script replaces those
methods of ``torch.Tensor`` (and ``torch.nonzero``) by counting wrappers and runs ``NCATrainer.compute_loss`` on one
collated batch per layout, for reward data (K = 2..4) and pairwise data; it reports the calls made from the kit's code
(``nca_kit/``) and from the libraries it calls (transformers, peft, torch), each by caller line, then the same for the
logging step (``NCATrainer.log``). Asynchronous device-side assertions (``torch._assert_async``) are not counted:
they do not synchronise on a GPU. Calls inside C++ (e.g. boolean-mask indexing) are not visible to this count.

The batch comes from the trainer's own DataLoader, so host work done by the collator (NumPy) is outside the step.
Run it against another checkout by pointing ``PYTHONPATH`` there:

    PYTHONPATH=$PWD python bench/bench_syncs.py --json bench/records/syncs.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def counting():
    """Count value reads by caller (file:line), restoring the methods afterwards."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in METHODS}
    original_nonzero = torch.nonzero

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            frame = sys._getframe(1)
            counts[(name, frame.f_code.co_filename, frame.f_lineno)] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    torch.nonzero = wrap("nonzero", original_nonzero)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = original_nonzero


def where(filename: str) -> str:
    return "kit" if "/nca_kit/" in filename else "library"


def summarise(counts) -> dict:
    by = collections.Counter()
    sites = collections.Counter()
    for (name, filename, line), n in counts.items():
        by[where(filename)] += n
        short = filename.split("/nca_kit/")[-1] if "/nca_kit/" in filename else "/".join(filename.split("/")[-2:])
        sites[f"{name} {short}:{line}"] += n
    return {"kit": by["kit"], "library": by["library"], "sites": dict(sites.most_common())}


def tiny_trainer(pairwise: bool, layout: str, tmp: str):
    import datasets
    from peft import get_peft_model
    from transformers import TrainingArguments

    from nca_kit.logps import RewardCollator, tokenize_reward_dataset
    from nca_kit.models import LoraSettings, tiny_model, tiny_tokenizer
    from nca_kit.training import NCATrainer

    tok = tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"question {i}: " + "why " * (3 + i)}],
             "responses": ([f"yes {'a' * i}", "no"] if pairwise else
                           [f"answer {j} " + "so " * (i + j) for j in range(2 + i % 3)]),
             "rewards": [1.0, 0.0] if pairwise else [float(j) for j in range(2 + i % 3)]} for i in range(8)]
    data = tokenize_reward_dataset(datasets.Dataset.from_list(rows), tok, max_prompt_length=64, max_length=128)
    data = data.add_column("reference_logps", [[0.0] * len(r) for r in data["rewards"]])
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraSettings(lora_dropout=0.0).to_peft())
    model.config._attn_implementation = "sdpa"
    args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=4, use_cpu=True, report_to="none",
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = NCATrainer(model=model, args=args, data_collator=RewardCollator(tok.pad_token_id), train_dataset=data,
                         loss_type="nca", pairwise=pairwise, logps_forward=layout, beta=0.1)
    return trainer


def measure(pairwise: bool, layout: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = tiny_trainer(pairwise, layout, tmp)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        with counting() as step:
            loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
            loss.backward()
        with counting() as logging:
            logs: dict = {"loss": 0.0}
            trainer.log(logs)
    return {"data": "pairwise" if pairwise else "reward", "layout": layout, "step": summarise(step),
            "logging_step": summarise(logging)}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["padded", "packed", "shared_prompt", "tree", "auto"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [measure(pairwise, layout) for pairwise in (False, True) for layout in args.layouts]
    print("| data | layout | syncs in compute_loss + backward: kit / libraries | logging step: kit / libraries |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['data']} | {r['layout']} | {r['step']['kit']} / {r['step']['library']} | "
              f"{r['logging_step']['kit']} / {r['logging_step']['library']} |")
    for r in results:
        print(f"\n{r['data']} {r['layout']}: step sites {r['step']['sites']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
