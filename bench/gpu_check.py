"""The QLoRA training step at the Mistral-7B shape on one GPU: measured peak memory vs the planner, steps per second,
host synchronisations per step, the packed layout with flash attention when it is installed, and (first) every
forward layout under sdpa and flex attention against the padded eager forward (log-probs and LoRA gradients).

Random weights at Mistral-7B's widths (hidden 4096, intermediate 14336, 32 / 8 heads, vocabulary 32000; all 32
layers unless ``--layers`` says fewer) are saved to a temporary folder and loaded the way a run loads them
(``nca_kit.models.load_model``: NF4 double-quantised base, LoRA r 16 on all projections,
``prepare_model_for_kbit_training``, gradient checkpointing), the forward under bf16 autocast as accelerate runs the
Trainer's ``bf16=True``. One step = ``sequence_logps`` (padded layout, chunked head) -> NCA loss -> backward -> AdamW.
For each setting (checkpointing on / off x per-device batch) it records ``torch.cuda.max_memory_allocated`` against
``nca_kit.plan.predict_step`` for the same batch, the mean step time after one warm-up step, and the host
synchronisations of one step (``torch.cuda.set_sync_debug_mode("warn")``). Settings the planner says will not fit in
the GPU's memory are skipped (and recorded as skipped); an out-of-memory error is recorded, not fatal. Results go to
``<out>/gpu_check.json``, rewritten after every setting, so a run stopped by its time limit keeps what it measured.

    scripts/gpu_check.sh [out_dir]          # on a GPU machine, under 10 minutes on one H100 / H200
    python bench/gpu_check.py --dry-run --out /tmp/check   # the same code path on CPU at a tiny shape (seconds)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


def train_step(model, batch, optimizer, *, forward: str = "padded"):
    """One NCA micro-step as the trainer runs it (device-side checks, no host reads of the loss)."""
    from nca_kit.logps import sequence_logps
    from nca_kit.losses import device_checks, reward_loss

    with device_checks():
        policy = sequence_logps(model, batch, forward=forward)  # (B, K)
        losses, _ = reward_loss(policy, batch["reference_logps"], batch["rewards"], alpha=0.01, beta=0.01,
                                loss_type="nca", mask=batch["response_mask"])
        loss = losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def count_syncs(step) -> int | None:
    """Host synchronisations during ``step()`` on CUDA (``set_sync_debug_mode`` warnings); ``None`` on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on or off on a loaded (PEFT) model; the embedding output keeps requiring grad."""
    from nca_kit.logps import unwrap_model

    inner = unwrap_model(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if on:
        from nca_kit.models import enable_checkpointing

        enable_checkpointing(inner)
    elif hasattr(inner, "activation_checkpointing_disable"):
        inner.activation_checkpointing_disable()
    else:
        inner.gradient_checkpointing_disable()


def check(args) -> dict:
    import torch

    from nca_kit import plan as P

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    compute = "bfloat16" if cuda else args.compute_dtype
    compute_bytes = 2 if compute == "bfloat16" else 4
    base = P.NAMED_SHAPES["mistral-7b-sft-beta"] if args.shape == "mistral-7b" else P.ModelShape(
        hidden_size=64, intermediate_size=224, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=384, name="tiny")
    shape = base.with_layers(args.layers) if args.layers else base
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / P.GIB if cuda else None
    record = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "gpu_memory_gib": gpu_gib,
              "shape": {"name": shape.name, "layers": shape.num_layers, "hidden_size": shape.hidden_size,
                        "intermediate_size": shape.intermediate_size, "vocab_size": shape.vocab_size},
              "k": args.k, "length": args.length, "prompt_length": args.prompt_length, "compute_dtype": compute,
              "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                           "peft": __import__("peft").__version__,
                           "bitsandbytes": __import__("bitsandbytes").__version__,
                           "python": platform.python_version()},
              "command": " ".join(sys.argv), "settings": [], "notes": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write():
        (out / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")

    started = time.perf_counter()
    if args.layout_check:
        t0 = time.perf_counter()
        record["layout_equality"] = layout_equality(device, args.layout_attention)
        record["layout_equality_s"] = round(time.perf_counter() - t0, 1)
        write()
    folder = Path(tempfile.mkdtemp(prefix="nca-kit-gpu-check-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        P.save_random_model(shape, folder, device=str(device) if cuda else "cpu")
        if cuda:
            torch.cuda.empty_cache()
        model = P.load_for_step(folder, mode="qlora", gradient_checkpointing=True, device=str(device),
                                attention="sdpa", compute_dtype=compute)
        record["load_s"] = round(time.perf_counter() - t0, 1)
        state = P.count_state_bytes(model)
        record["weights_measured"] = state["weights"]
        record["weights_predicted"] = P.weight_bytes(shape, "qlora")["total"]
        record["nf4_measured"] = P.quantized_weight_bytes(model)["total"]
        record["nf4_predicted"] = P.weight_bytes(shape, "qlora")["projections"]
        write()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for checkpointing in args.checkpointing:
            set_checkpointing(model, checkpointing == "on")
            for prompts in args.batches:
                if time.perf_counter() - started > args.time_budget:
                    record["notes"].append(f"time budget reached before checkpointing {checkpointing}, batch "
                                           f"{prompts}")
                    write()
                    continue
                batch = P.synthetic_batch(prompts=prompts, k=args.k, length=args.length,
                                          prompt_length=args.prompt_length, vocab_size=shape.vocab_size,
                                          pad_token_id=3)
                batch["reference_logps"] = torch.zeros(batch["response_mask"].shape)
                rows, targets = prompts * args.k, int(batch["loss_mask"][:, 1:].sum())
                predicted = P.predict_step(shape, rows=rows, length=args.length, targets=targets, mode="qlora",
                                           gradient_checkpointing=checkpointing == "on",
                                           device="cuda" if cuda else "cpu", compute_bytes=compute_bytes,
                                           input_requires_grad=True)
                entry = {"gradient_checkpointing": checkpointing == "on", "per_device_batch_size": prompts,
                         "rows": rows, "tokens": rows * args.length, "response_positions": targets,
                         "predicted": predicted}
                record["settings"].append(entry)
                if cuda and predicted["peak"] > 0.95 * gpu_gib * P.GIB:
                    entry["skipped"] = "predicted peak above 95 % of the GPU's memory"
                    write()
                    continue
                batch = {key: value.to(device) for key, value in batch.items()}
                entry.update(run_setting(model, batch, optimizer, steps=args.steps, cuda=cuda, forward="padded"))
                write()
        if args.packed:
            entry = {"layout": "packed", "attention": "flash_attention_2", "per_device_batch_size": args.batches[0]}
            record["settings"].append(entry)
            if not record["flash_attn_installed"]:
                entry["skipped"] = "flash_attn is not installed (pip install flash-attn --no-build-isolation)"
            elif time.perf_counter() - started > args.time_budget:
                entry["skipped"] = "time budget reached"
            else:
                set_checkpointing(model, True)
                unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
                unwrapped.set_attn_implementation("flash_attention_2")
                batch = P.synthetic_batch(prompts=args.batches[0], k=args.k, length=args.length,
                                          prompt_length=args.prompt_length, vocab_size=shape.vocab_size,
                                          pad_token_id=3)
                batch["reference_logps"] = torch.zeros(batch["response_mask"].shape)
                batch = {key: value.to(device) for key, value in batch.items()}
                entry.update(run_setting(model, batch, optimizer, steps=args.steps, cuda=cuda, forward="packed"))
            write()
        del model, optimizer
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record["total_s"] = round(time.perf_counter() - started, 1)
    write()
    return record


def layout_equality(device, attentions=("sdpa", "flex_attention")) -> list[dict]:
    """Each forward layout under each attention implementation against the padded eager forward, on a small fp32 model
    with perturbed LoRA adapters: largest log-prob and LoRA-gradient differences (the tests' 1e-5 criterion on CPU,
    where flex attention has no backward; here it gets its gradient check on a GPU)."""
    import torch
    from peft import get_peft_model

    from nca_kit.logps import RewardCollator, sequence_logps
    from nca_kit.models import LoraSettings, tiny_model

    torch.manual_seed(0)
    model = tiny_model("mistral", vocab_size=384, hidden_size=128)
    model = get_peft_model(model, LoraSettings(lora_dropout=0.0).to_peft()).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(4, 384, (n,), generator=g).tolist()

    records = [{"prompt_input_ids": ids(p), "response_input_ids": [ids(r) for r in rs], "rewards": list(range(len(rs)))}
               for p, rs in [(40, (12, 30, 5)), (9, (50, 7)), (25, (3, 18, 18, 40))]]
    batch = {k: v.to(device) for k, v in RewardCollator(0)(records).items()}
    mask = batch["response_mask"]

    def run(attention, layout, grad):
        model.get_base_model().config._attn_implementation = attention
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            logps = sequence_logps(model, batch, forward=layout)
            if grad:
                (logps[mask] * torch.linspace(0.5, 1.5, int(mask.sum()), device=device)).sum().backward()
        grads = [p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n] if grad else None
        return logps.detach(), grads

    results = []
    ref_logps, ref_grads = run("eager", "padded", True)
    flex_backward = torch.device(device).type != "cpu"
    for attention in attentions:
        for layout in ("padded", "packed", "tree", "shared_prompt"):
            entry = {"attention": attention, "layout": layout}
            grad = attention != "flex_attention" or flex_backward
            try:
                logps, grads = run(attention, layout, grad)
                entry["max_logp_diff"] = float((logps - ref_logps)[mask].abs().max())
                if grads is not None:
                    entry["max_grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
                else:
                    entry["grad"] = "not checked: flex attention has no backward on CPU"
            except Exception as error:  # recorded, not fatal: the remaining checks still run
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            results.append(entry)
    return results


def run_setting(model, batch, optimizer, *, steps: int, cuda: bool, forward: str) -> dict:
    """Warm-up step, then ``steps`` timed steps; peak memory of the warm-up and timed steps together."""
    import torch

    from nca_kit import plan as P
    from nca_kit.logps import sequence_logps

    result: dict = {}
    try:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        train_step(model, batch, optimizer, forward=forward)  # warm-up: AdamW states exist from here on
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step(model, batch, optimizer, forward=forward)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        result.update(step_s=round(elapsed / steps, 3), steps_per_s=round(steps / elapsed, 3),
                      tokens_per_s=round(steps * batch["input_ids"].numel() / elapsed), loss=float(loss))
        if cuda:
            result.update(peak_allocated=torch.cuda.max_memory_allocated(), allocated_before=base,
                          peak_reserved=torch.cuda.max_memory_reserved())
            result["syncs_per_step"] = count_syncs(lambda: train_step(model, batch, optimizer, forward=forward))
        else:  # no allocator statistics on a CPU: the bytes autograd holds after the forward, measured
            saved = P.measure_saved_bytes(model, lambda: sequence_logps(model, batch, forward=forward))
            result["activations_measured"] = saved["total"]
            del saved
            optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
        optimizer.zero_grad(set_to_none=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json (default: %(default)s)")
    parser.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    parser.add_argument("--shape", choices=("mistral-7b", "tiny"), default="mistral-7b")
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's own (32 for Mistral-7B)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="per-device batches (prompts)")
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting after one warm-up")
    parser.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                        help="also the packed layout with flash attention (if flash_attn is installed)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="on CPU only (a GPU always runs bf16 autocast)")
    parser.add_argument("--time-budget", type=float, default=420, help="seconds; later settings are skipped")
    parser.add_argument("--tmp", default=None, help="folder for the random model (needs ~15 GB at 32 layers)")
    parser.add_argument("--layout-check", action=argparse.BooleanOptionalAction, default=True,
                        help="first: every layout under sdpa and flex attention against the padded eager forward "
                             "(log-probs and LoRA gradients, small fp32 model)")
    parser.add_argument("--layout-attention", nargs="+", choices=("sdpa", "flex_attention", "eager"),
                        default=["sdpa", "flex_attention"], help="attention implementations the layout check runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code path on CPU at a tiny shape: --device cpu --shape tiny --layers 1 "
                             "--k 2 --length 48 --prompt-length 8 --batches 1 --steps 1 --checkpointing on off")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.shape, args.layers, args.k, args.length = "cpu", "tiny", 1, 2, 48
        args.prompt_length, args.batches, args.steps = 8, [1], 1
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    record = check(args)
    print(json.dumps({"device": record["device"], "layout_equality": record.get("layout_equality"), "settings": [
        {key: entry.get(key) for key in ("gradient_checkpointing", "per_device_batch_size", "layout", "step_s",
                                         "peak_allocated", "activations_measured", "syncs_per_step", "skipped",
                                         "error")} | {"predicted_peak": entry.get("predicted", {}).get("peak")}
        for entry in record["settings"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
