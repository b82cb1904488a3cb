"""Peak memory and time of the log-prob head: the chunked head (``nca_kit.logps.head_token_logps``) against
applying the output layer to all ``M`` response positions at once (the head before chunking).

The head maps final hidden states ``(M, H)`` to ``log softmax(lm_head(h))[target]`` ``(M,)``; forward + backward
with the states requiring gradient and the output layer frozen (LoRA training: the base ``lm_head`` is frozen).

Memory method: each measurement runs in a fresh process (``MALLOC_MMAP_THRESHOLD_`` fixed so that freed large
tensors go back to the system at once). The inputs are allocated first; then the process's peak RSS is reset
(``/proc/self/clear_refs``, 5) and the head runs forward + backward once; the figure is the peak RSS (``VmHWM``)
minus the RSS just before. It counts everything the head allocates, including the ``(M, H)`` gradient of the states
(the same in both). The one-shot head is run only where its ``(M, V)`` fp32 logits are at most ``--max-full-gib``
(it needs a few times that), so as not to exhaust the shared machine; the other cells say "not run".

Time: in one process, the two heads alternate ``--repeats`` times at each ``(V, M)`` of ``--time-m``; forward +
backward and forward alone; median seconds. The chunked head's backward recomputes each chunk's logits, which is
its extra cost.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/bench_head.py --json bench/records/head.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch


class HeadOnly(torch.nn.Module):
    """Just an output layer, with the two things ``nca_kit.logps`` reads from a causal LM (its output embeddings and
    its config)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.config = types.SimpleNamespace(vocab_size=vocab)

    def get_output_embeddings(self):
        return self.lm_head


def full_head(model, states, targets):
    """The head before chunking: logits of all M positions at once, float32, log-softmax at the targets."""
    from nca_kit.logps import _scale_logits, _token_logps

    return _token_logps(_scale_logits(model, model.lm_head(states)), targets)


def chunked_head(model, states, targets):
    from nca_kit.logps import head_token_logps

    return head_token_logps(model, states, targets)


HEADS = {"full": full_head, "chunked": chunked_head}


def inputs(vocab: int, m: int, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    model = HeadOnly(vocab, hidden)
    states = torch.randn(m, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (m,))
    return model, states, targets


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(head: str, vocab: int, m: int, hidden: int) -> dict:
    model, states, targets = inputs(vocab, m, hidden)
    HEADS[head](model, states[:8], targets[:8]).sum().backward()  # warm up kernels and lazy allocations
    states.grad = None
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    HEADS[head](model, states, targets).sum().backward()
    peak = _rss_kib("VmHWM")
    return {"head": head, "vocab": vocab, "m": m, "peak_mib": (peak - before) / 1024}


def timing(vocab: int, m: int, hidden: int, repeats: int) -> dict:
    model, states, targets = inputs(vocab, m, hidden)
    times: dict = {f"{h}_{part}": [] for h in HEADS for part in ("fwd_bwd", "fwd")}
    values = {}
    for _ in range(repeats):
        for name, fn in HEADS.items():
            states.grad = None
            start = time.perf_counter()
            out = fn(model, states, targets)
            mid = time.perf_counter()
            out.sum().backward()
            end = time.perf_counter()
            times[f"{name}_fwd"].append(mid - start)
            times[f"{name}_fwd_bwd"].append(end - start)
            values[name] = (out.detach(), states.grad.clone())
    diff = max(float((values["chunked"][i] - values["full"][i]).abs().max()) for i in range(2))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"vocab": vocab, "m": m, "median_s": med, "max_abs_diff": diff,
            "fwd_bwd_ratio": med["chunked_fwd_bwd"] / med["full_fwd_bwd"],
            "fwd_ratio": med["chunked_fwd"] / med["full_fwd"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--m", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="response positions")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-full-gib", type=float, default=1.0,
                        help="run the one-shot head only where its (M, V) fp32 logits are at most this")
    parser.add_argument("--time-m", type=int, nargs="+", default=[2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        head, vocab, m = args.worker
        print(json.dumps(memory_worker(head, int(vocab), int(m), args.hidden)))
        return {}
    from nca_kit.logps import HEAD_CHUNK_ELEMENTS

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    memory: dict = {}
    for vocab in args.vocab:
        for m in args.m:
            for head in HEADS:
                if head == "full" and m * vocab * 4 / 2**30 > args.max_full_gib:
                    memory[f"{head}/{vocab}/{m}"] = None
                    continue
                out = subprocess.run([sys.executable, __file__, "--worker", head, str(vocab), str(m),
                                      f"--hidden={args.hidden}"], capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(f"{head} V={vocab} M={m} failed:\n{out.stderr[-3000:]}")
                run = json.loads(out.stdout.strip().splitlines()[-1])
                memory[f"{head}/{vocab}/{m}"] = run["peak_mib"]
                print(f"memory {head:7s} V={vocab:6d} M={m:5d}: {run['peak_mib']:.0f} MiB", flush=True)
    timings = [timing(vocab, m, args.hidden, args.repeats) for vocab in args.vocab for m in args.time_m]
    for t in timings:
        print(f"time V={t['vocab']} M={t['m']}: {t['median_s']}, diff {t['max_abs_diff']:.1e}", flush=True)

    print(f"\nhead peak memory, MiB (forward + backward, H = {args.hidden}, chunks of {HEAD_CHUNK_ELEMENTS} logits):")
    print("| V | M | one-shot | chunked | chunked / one-shot |")
    print("|---|---|---|---|---|")
    for vocab in args.vocab:
        for m in args.m:
            full, chunked = memory[f"full/{vocab}/{m}"], memory[f"chunked/{vocab}/{m}"]
            ratio = f"1/{full / chunked:.1f}" if full else "-"
            print(f"| {vocab} | {m} | {f'{full:.0f}' if full else 'not run'} | {chunked:.0f} | {ratio} |")
    print("\n| V | M | one-shot fwd+bwd s | chunked fwd+bwd s | time ratio fwd+bwd | time ratio fwd | max |diff| |")
    print("|---|---|---|---|---|---|---|")
    for t in timings:
        s = t["median_s"]
        print(f"| {t['vocab']} | {t['m']} | {s['full_fwd_bwd']:.2f} | {s['chunked_fwd_bwd']:.2f} | "
              f"{t['fwd_bwd_ratio']:.2f}x | {t['fwd_ratio']:.2f}x | {t['max_abs_diff']:.1e} |")
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
              "chunk_elements": HEAD_CHUNK_ELEMENTS, "memory_mib": memory, "timing": timings}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
