"""Validate the memory planner (nca_kit.plan) against measurement at reduced depth of the Mistral-7B shape, on CPU.

For each layer count (1, 2, 4 of Mistral-7B's widths: hidden 4096, intermediate 14336, 32 / 8 heads, vocabulary 32000;
random bf16 weights saved to a temporary folder) and gradient checkpointing off / on, the model is loaded the way a
run loads it (QLoRA: NF4 double-quantised base, LoRA r 16 on all projections, ``prepare_model_for_kbit_training``,
forward under bf16 autocast as accelerate runs the Trainer's ``bf16=True``) and one training step runs on a padded
batch of ``prompts x K`` rows of ``length`` tokens through ``nca_kit.logps.sequence_logps`` (the chunked head), then
``backward`` and an AdamW step. Measured:

* activations: the bytes autograd holds at the end of the forward (``plan.measure_saved_bytes``: saved-tensor hooks
  plus the inputs kept by the checkpoints, storages counted once, parameters left out);
* weights, adapter, gradients, optimizer states: counted from the tensors after the step (``plan.count_state_bytes``);
  the 4-bit weights as bitsandbytes stores them (packed weights plus every quant-state tensor);
* the process's resident memory before and after the forward (``/proc/self/statm``), for reference only (allocator
  dependent).

Predicted: ``plan.activation_bytes`` / ``plan.weight_bytes`` / the trainable terms for the same rows, length and
response positions, with ``device="cpu"`` (a CPU's dropout keeps an fp32 mask where CUDA keeps a bool). Then the
prediction for the full recipe (32 layers, K = 4 x 1,024, per-device batch 1, 2, 4, checkpointing on and off) on 80 GB
and 141 GB GPUs with ``device="cuda"``. Writes one JSON record.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/plan_validate.py --out results/plan_validation.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(shape, folder, *, gradient_checkpointing, attention, prompts, k, length, prompt_length, mode,
            compute_dtype, head_chunk):
    import torch

    from nca_kit import logps, plan as P
    from nca_kit.logps import sequence_logps

    logps.HEAD_CHUNK_ELEMENTS = head_chunk * shape.vocab_size  # chunks of head_chunk positions, as in a long batch

    model = P.load_for_step(folder, mode=mode, gradient_checkpointing=gradient_checkpointing, attention=attention,
                            compute_dtype=compute_dtype)
    compute_bytes = 2 if compute_dtype == "bfloat16" else 4
    batch = P.synthetic_batch(prompts=prompts, k=k, length=length, prompt_length=prompt_length,
                              vocab_size=shape.vocab_size, pad_token_id=3)
    rows = prompts * k
    targets = int(batch["loss_mask"][:, 1:].sum())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gc.collect()
    rss_before = rss_bytes()
    start = time.perf_counter()
    measured = P.measure_saved_bytes(model, lambda: sequence_logps(model, batch, forward="padded"))
    forward_s = time.perf_counter() - start
    rss_after = rss_bytes()
    measured["output"].sum().backward()
    optimizer.step()
    step_s = time.perf_counter() - start
    state = P.count_state_bytes(model, optimizer)
    quantized = P.quantized_weight_bytes(model)
    predicted_act = P.activation_bytes(shape, rows=rows, length=length, targets=targets, mode=mode,
                                       gradient_checkpointing=gradient_checkpointing, attention=attention,
                                       device="cpu", compute_bytes=compute_bytes,
                                       head_chunk_elements=logps.HEAD_CHUNK_ELEMENTS)
    predicted_weights = P.weight_bytes(shape, mode)
    trainable = P._trainable(shape, mode, 16, P.PROJECTIONS, 2)
    predicted = {"activations": predicted_act["total"], "weights": predicted_weights["total"],
                 "nf4_projections": predicted_weights["projections"], **trainable}
    got = {"activations": measured["total"], "weights": state["weights"], "nf4_projections": quantized["total"],
           "adapter": state["adapter"], "gradients": state["gradients"], "optimizer": state["optimizer"]}
    predicted["total"] = sum(predicted[key] for key in ("activations", "weights", "adapter", "gradients", "optimizer"))
    got["total"] = sum(got[key] for key in ("activations", "weights", "adapter", "gradients", "optimizer"))
    del model, optimizer, measured, batch
    gc.collect()
    return {"layers": shape.num_layers, "mode": mode, "gradient_checkpointing": gradient_checkpointing,
            "attention": attention, "rows": rows, "length": length, "tokens": rows * length,
            "response_positions": targets, "head_chunk_positions": head_chunk, "measured": got, "predicted": predicted,
            "ratio": {key: round(predicted[key] / got[key], 4) for key in got if got[key]},
            "rss_forward_delta": rss_after - rss_before, "forward_s": round(forward_s, 1),
            "step_s": round(step_s, 1)}


def tables(record: dict) -> str:
    """The README's two tables (validation; recipe prediction), from a record written by this script."""
    gib = 2**30
    lines = ["| layers | checkpointing | tokens | activations predicted / measured (MiB) | weights + adapter + "
             "gradients + AdamW predicted / measured (MiB) | NF4 projections predicted / measured (MiB) | "
             "total predicted / measured |",
             "|---|---|---|---|---|---|---|"]
    for run in record["runs"]:
        p, m = run["predicted"], run["measured"]
        static_p = p["total"] - p["activations"]
        static_m = m["total"] - m["activations"]
        lines.append(f"| {run['layers']} | {'on' if run['gradient_checkpointing'] else 'off'} | {run['tokens']} | "
                     f"{p['activations'] / 2**20:.1f} / {m['activations'] / 2**20:.1f} | "
                     f"{static_p / 2**20:.1f} / {static_m / 2**20:.1f} | "
                     f"{p['nf4_projections'] / 2**20:.2f} / {m['nf4_projections'] / 2**20:.2f} | "
                     f"{p['total'] / m['total']:.4f} |")
    lines += ["", "| GPU | checkpointing | per-device batch | weights | adapter + grads + AdamW | activations | "
              "backward working set (modelled) | predicted peak (GiB) | fits (90 % of memory) | largest batch / "
              "accumulation to 32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["recipe_prediction"]:
        trained = (row["adapter"] + row["gradients"] + row["optimizer"]) / gib
        lines.append(f"| {row['gpu']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                     f"{row['per_device_batch_size']} | {row['weights_gib']:.2f} | {trained:.2f} | "
                     f"{row['activations_gib']:.2f} | {row['backward_working_gib']:.2f} | {row['peak_gib']:.2f} | "
                     f"{'yes' if row['fits'] else 'no'} | {row['largest_batch']} / {row['gradient_accumulation']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", metavar="RECORD", default=None,
                        help="print the README tables of an existing record and exit")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--head-chunk", type=int, default=32,
                        help="positions per chunk of the output layer (the kit's default is 524 at V = 32000; "
                             "fewer here so that this short batch runs the chunked head as a long one does)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RECORD",
                        help="combine the runs of these records (e.g. one per layer count, run side by side) into "
                             "--out, with the recipe prediction recomputed")
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=["sdpa", "eager"])
    parser.add_argument("--mode", default="qlora", choices=["qlora", "lora"])
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="float32: the kit's QLoRA on a CPU without native bf16 (emulated bf16 matmuls at these "
                             "widths take minutes each); bfloat16: autocast as on a GPU")
    parser.add_argument("--out", default="results/plan_validation.json")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return 0

    import torch

    from nca_kit import plan as P

    torch.manual_seed(0)
    base = P.NAMED_SHAPES["mistral-7b-sft-beta"]
    runs, commands = [], []
    if args.merge:
        for path in args.merge:
            merged = json.loads(Path(path).read_text())
            runs += merged["runs"]
            commands.append(merged["command"])
        runs.sort(key=lambda run: (run["layers"], run["attention"], run["gradient_checkpointing"]))
        args.layers = []
    for layers in args.layers:
        shape = base.with_layers(layers)
        folder = Path(tempfile.mkdtemp(prefix="nca-kit-plan-"))
        try:
            P.save_random_model(shape, folder)
            for attention in args.attention:
                for checkpointing in (False, True):
                    run = measure(shape, folder, gradient_checkpointing=checkpointing, attention=attention,
                                  prompts=args.prompts, k=args.k, length=args.length,
                                  prompt_length=args.prompt_length, mode=args.mode,
                                  compute_dtype=args.compute_dtype, head_chunk=args.head_chunk)
                    print(json.dumps({key: run[key] for key in ("layers", "gradient_checkpointing", "attention",
                                                                "ratio", "step_s")}), flush=True)
                    runs.append(run)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    recipe = []
    for gpu_gib, gpu in ((80e9 / P.GIB, "80 GB (H100)"), (141e9 / P.GIB, "141 GB (H200)")):
        for checkpointing in (True, False):
            for batch in (1, 2, 4):
                result = P.plan("mistral-7b-sft-beta", k=4, max_length=1024, mode="qlora",
                                gradient_checkpointing=checkpointing, per_device_batch_size=batch,
                                gpu_memory_gib=gpu_gib)
                recipe.append({"gpu": gpu, **result.summary()})
    record = {
        "what": "memory planner validation: predicted vs measured at 1, 2, 4 layers of the Mistral-7B shape on CPU "
                "(QLoRA, bf16 autocast), and the planner's prediction for the full K = 4 x 1,024 recipe",
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/plan_validate.py " + " ".join(argv or
                                                                                               sys.argv[1:]),
        "merged_from": commands or None,
        "measured_how": "activations: bytes of the tensors autograd holds at the end of the forward "
                        "(saved_tensors_hooks + checkpoint inputs, unique storages, parameters excluded); weights, "
                        "adapter, gradients, optimizer: bytes counted from the tensors after backward + AdamW step",
        "settings": {"prompts": args.prompts, "k": args.k, "length": args.length,
                     "prompt_length": args.prompt_length, "head_chunk_positions": args.head_chunk, "mode": args.mode, "lora_r": 16, "lora_dropout": 0.05,
                     "double_quant": True, "device": "cpu", "compute_dtype": args.compute_dtype},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
                     "python": platform.python_version()},
        "runs": runs,
        "recipe_prediction": recipe,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
