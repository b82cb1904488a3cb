r"""Will it fit? A memory planner for one training step of the kit on a GPU, before renting one.

``plan(model, k=4, max_length=1024, mode="qlora", gradient_checkpointing=True, gpu_memory_gib=80)`` predicts the
peak memory of one optimizer micro-step of :mod:`nca_kit.training` and splits it into

* **weights**: the frozen base. QLoRA: every decoder projection (q/k/v/o, gate/up/down) in bitsandbytes' NF4 format,
  4 bits a weight plus one absmax per block of 64 weights (an fp32 per block, or, double-quantised, a uint8 per block
  plus an fp32 per 256 blocks, an fp32 offset and the two code books); the embedding, the output layer and the norms
  in fp32 (``peft.prepare_model_for_kbit_training`` upcasts everything not in 4 bits). LoRA / full: bf16 weights.
* **adapter**, **gradients**, **optimizer states**: the trainable parameters (LoRA: fp32 adapters, as peft keeps
  them), their gradients and AdamW's two moments (plus its step counters), counted from the parameter shapes.
* **activations**: the bytes autograd holds for the backward pass at the end of the forward, per token of the padded
  ``(B*K, T)`` batch (:func:`activation_bytes`). The formula lists, for each op of a Mistral / Llama decoder layer,
  what it saves (its ``saved_tensors_hooks`` record: the RMSNorm's fp32 input and 1/rms, each LoRA branch's dropout
  mask, bf16 input and rank-``r`` output, the attention kernel's q, k, v, output and log-sum-exp, the MLP's three
  ``I``-wide tensors), plus the output layer of the kit's own forward (:func:`nca_kit.logps.sequence_logps`: the final
  norm and the chunked head, which keeps only the selected hidden states). With gradient checkpointing a layer keeps
  only its input.
* **backward working set**: what is alive on top of that while the backward runs (one recomputed layer under
  checkpointing, the gradient of the hidden states, one chunk of the output layer's logits and its gradient, a
  de-quantised weight). Modelled, not measured: a CPU has no allocator statistics, so this term is checked only on a
  GPU (``scripts/gpu_check.sh``).

Then the largest per-device batch (prompts, each with its ``K`` responses) that fits and the gradient accumulation
that makes up the recipe's batch (32 prompts, Appendix C).

Assumptions, all stated in :class:`Plan`: the padded layout at full length (every row ``T = max_length`` tokens, the
worst batch), bf16 autocast as the Trainer runs it on a GPU, the ``sdpa`` attention kernel of a flash-style backend
(saves q, k, v, output and log-sum-exp, no ``T x T`` matrix; with a padding mask transformers repeats k and v to all
heads) or ``eager`` (saves the ``T x T`` probabilities). Validated against measurement at reduced depth
(``bench/plan_validate.py``, record ``results/plan_validation.json``): :func:`measure_saved_bytes` counts the bytes
autograd actually keeps, :func:`count_state_bytes` the parameters, gradients and optimizer states.

``python -m nca_kit.plan --model mistral-7b-sft-beta --k 4 --max-length 1024 --mode qlora --gpu-memory-gib 80``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["ModelShape", "NAMED_SHAPES", "model_shape", "nf4_bytes", "weight_bytes", "adapter_parameters",
           "activation_bytes", "predict_step", "Plan", "plan", "largest_batch", "measure_saved_bytes", "count_state_bytes",
           "quantized_weight_bytes", "save_random_model", "synthetic_batch", "load_for_step", "MODES", "ATTENTION_KERNELS", "main"]

MODES = ("qlora", "lora", "full")
ATTENTION_KERNELS = ("sdpa", "eager")
GIB = 2**30
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (QLoRA; transformers' default bnb_4bit_blocksize)
NESTED_BLOCK = 256  # double quantisation: the absmax values quantised to 8 bits in blocks of 256
HEAD_CHUNK_ELEMENTS = 2**24  # = nca_kit.logps.HEAD_CHUNK_ELEMENTS (kept here so the planner imports no torch)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a Mistral / Llama-style decoder: its widths, depth and vocabulary."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    name: str = ""

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.d_head  # (B, T, q_dim) queries; = hidden_size for Mistral-7B

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.d_head  # keys / values per token (grouped-query attention)

    def projections(self) -> dict[str, tuple[int, int]]:
        """``name -> (out_features, in_features)`` of the seven projections of one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def layer_parameters(self) -> int:
        return sum(o * i for o, i in self.projections().values()) + 2 * self.hidden_size  # + two RMSNorm weights

    def parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * self.layer_parameters() + embed + head + self.hidden_size  # + the final norm

    def with_layers(self, num_layers: int) -> "ModelShape":
        return replace(self, num_layers=num_layers, name=f"{self.name} ({num_layers} layers)" if self.name else "")

    @classmethod
    def from_config(cls, config, name: str = "") -> "ModelShape":
        """From a ``transformers`` config (Mistral, Llama, Qwen2 and others with the same projections)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        get = (lambda key, default=None: config.get(key, default)) if isinstance(config, dict) else \
            (lambda key, default=None: getattr(config, key, default))
        missing = [key for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "vocab_size") if get(key) is None]
        if missing:
            raise ValueError(f"{name or 'the model config'} has no {', '.join(missing)}: the planner needs a "
                             "Mistral / Llama-style decoder config")
        return cls(hidden_size=int(get("hidden_size")), intermediate_size=int(get("intermediate_size")),
                   num_layers=int(get("num_hidden_layers")), num_heads=int(get("num_attention_heads")),
                   num_kv_heads=int(get("num_key_value_heads") or get("num_attention_heads")),
                   vocab_size=int(get("vocab_size")), head_dim=get("head_dim"),
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   max_position_embeddings=get("max_position_embeddings"), name=name)


#: Shapes written down as facts, usable offline. Mistral-7B (v0.1) is the paper's base: HuggingFaceH4/mistral-7b-sft-beta
#: is its SFT model, with Mistral-7B-v0.1's config.json.
NAMED_SHAPES = {
    "mistral-7b-sft-beta": ModelShape(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                                      num_kv_heads=8, vocab_size=32000, max_position_embeddings=32768,
                                      name="mistral-7b-sft-beta"),
}
_ALIASES = {"huggingfaceh4/mistral-7b-sft-beta": "mistral-7b-sft-beta", "mistral-7b": "mistral-7b-sft-beta",
            "mistralai/mistral-7b-v0.1": "mistral-7b-sft-beta"}


def model_shape(source) -> ModelShape:
    """A :class:`ModelShape` from a named shape (:data:`NAMED_SHAPES`; the paper's hub id maps to its shape), a local
    folder holding ``config.json``, a ``config.json`` file, a ``transformers`` config, a tiny test model name
    (``tiny-mistral``) or a hub id already in the local Hugging Face cache (never downloaded)."""
    if isinstance(source, ModelShape):
        return source
    if not isinstance(source, (str, Path)):
        return ModelShape.from_config(source, name=type(source).__name__)
    text = str(source)
    key = _ALIASES.get(text.lower(), text.lower())
    if key in NAMED_SHAPES:
        return NAMED_SHAPES[key]
    from nca_kit.models import TINY_NAMES

    if key in TINY_NAMES:
        from nca_kit.models import tiny_model

        return ModelShape.from_config(tiny_model(TINY_NAMES[key]).config, name=key)
    path = Path(text).expanduser()
    if path.is_file():
        return ModelShape.from_config(json.loads(path.read_text()), name=text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {text!r} has no config.json")
        return ModelShape.from_config(json.loads((path / "config.json").read_text()), name=text)
    if text.startswith(("/", "./", "../", "~")) or text.endswith(".json"):
        raise FileNotFoundError(f"{text!r} does not exist; pass a folder holding config.json, a config.json file, a "
                                f"hub id, or one of the named shapes: {', '.join(NAMED_SHAPES)}")
    try:
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(text, local_files_only=True), name=text)
    except (OSError, ValueError) as err:
        raise LookupError(f"no config for {text!r} in the local Hugging Face cache (the planner never downloads); pass "
                          "a local folder or config.json (on a machine with network: huggingface-cli download "
                          f"{text} config.json), or one of the named shapes: {', '.join(NAMED_SHAPES)}") from err


# --------------------------------------------------------------------------------------------------------------------
# Weights, adapter, gradients, optimizer states
# --------------------------------------------------------------------------------------------------------------------


def nf4_bytes(numel: int, *, double_quant: bool = True, blocksize: int = NF4_BLOCK) -> int:
    """Bytes of one weight matrix of ``numel`` weights in bitsandbytes' NF4 format.

    Two weights per byte, one absmax per block of ``blocksize`` weights and the 16-entry NF4 code book (fp32). Not
    double-quantised: the absmax values in fp32 (0.5 bit a weight at block 64). Double-quantised (QLoRA): the absmax
    values minus their mean (an fp32 offset) quantised to uint8 with the 256-entry dynamic code book (fp32) and one
    fp32 absmax per 256 blocks (0.127 bit a weight).
    """
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    code = 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + code + 256 * 4


def weight_bytes(shape: ModelShape, mode: str = "qlora", *, double_quant: bool = True,
                 weight_dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of the frozen (or, ``full``, trained) base weights: ``{"projections", "embeddings", "norms", "buffers",
    "total"}``.

    ``qlora``: the projections in NF4 (:func:`nf4_bytes`), everything else fp32 (peft upcasts it). ``lora`` /
    ``full``: every weight in ``weight_dtype_bytes`` (bf16: 2; what :func:`nca_kit.models.load_model` loads on a GPU).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    h = shape.hidden_size
    sizes = [o * i for o, i in shape.projections().values()]
    embed = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * h
    if mode == "qlora":
        projections = shape.num_layers * sum(nf4_bytes(n, double_quant=double_quant) for n in sizes)
        out = {"projections": projections, "embeddings": 4 * embed, "norms": 4 * norms}
    else:
        b = weight_dtype_bytes
        out = {"projections": shape.num_layers * sum(sizes) * b, "embeddings": b * embed, "norms": b * norms}
    out["buffers"] = 2 * 4 * (shape.d_head // 2)  # the rotary inverse frequencies and their original copy (fp32)
    out["total"] = sum(out.values())
    return out


def adapter_parameters(shape: ModelShape, r: int = 16, targets=PROJECTIONS) -> tuple[int, int]:
    """``(parameters, tensors)`` of LoRA adapters of rank ``r`` on ``targets`` in every layer (``A``: r x in,
    ``B``: out x r)."""
    unknown = set(targets) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; the planner knows {PROJECTIONS}")
    per_layer = sum(r * (o + i) for name, (o, i) in shape.projections().items() if name in targets)
    return shape.num_layers * per_layer, 2 * shape.num_layers * len(targets)


def _trainable(shape: ModelShape, mode: str, r: int, targets, weight_dtype_bytes: int) -> dict[str, int]:
    """Adapter (or, full, the weights themselves), gradients and AdamW states in bytes."""
    if mode == "full":
        n, tensors, b = shape.parameters(), 7 * shape.num_layers + 2 * shape.num_layers + 3, weight_dtype_bytes
        return {"adapter": 0, "gradients": n * b, "optimizer": 2 * n * b + 4 * tensors}
    n, tensors = adapter_parameters(shape, r, targets)
    # peft keeps LoRA weights in fp32 (autocast_adapter_dtype); AdamW: exp_avg, exp_avg_sq like the parameter, plus
    # a float32 step counter per parameter tensor
    return {"adapter": 4 * n, "gradients": 4 * n, "optimizer": 2 * 4 * n + 4 * tensors}


# --------------------------------------------------------------------------------------------------------------------
# Activations: the bytes autograd keeps for the backward pass
# --------------------------------------------------------------------------------------------------------------------


def activation_bytes(shape: ModelShape, *, rows: int, length: int, targets: int | None = None, mode: str = "qlora",
                     gradient_checkpointing: bool = True, attention: str = "sdpa", padding: bool = True,
                     lora_r: int = 16, lora_dropout: float = 0.05, lora_targets=PROJECTIONS,
                     device: str = "cuda", compute_bytes: int = 2, weight_dtype_bytes: int = 2,
                     head_chunk_elements: int = HEAD_CHUNK_ELEMENTS,
                     input_requires_grad: bool | None = None) -> dict[str, int]:
    """Bytes autograd holds at the end of the forward of ``sequence_logps(model, batch, forward="padded")`` on
    ``rows`` sequences of ``length`` tokens (``targets`` response positions; default all but the first of each row).

    Per token of a decoder layer, op by op (``H`` hidden, ``I`` intermediate, ``q``/``kv`` the query / key-value widths,
    ``a`` the residual stream's bytes (fp32 under QLoRA: peft upcasts the embedding), ``c`` the autocast compute bytes
    (bf16: 2), ``m`` a dropout mask's bytes (a bool on CUDA; on a CPU the mask is a tensor of the input's dtype, fp32)):

    * each RMSNorm: its fp32 input and 1/rms: ``4H + 4``;
    * each LoRA branch on an input of width ``d``: dropout mask ``m d``, the bf16 input of ``A`` (``c d``), the output of
      ``A`` (``c r``); the 4-bit (or frozen) base projection keeps nothing (bitsandbytes keeps only the packed weight);
    * attention, ``sdpa``: q, k, v and output in bf16 and the fp32 log-sum-exp per head; with a padding mask
      transformers repeats k and v to all heads (``c (2q + 2q) + 4 heads``; without a mask ``c (2q + 2kv)``), and
      the boolean mask is converted to the kernel's additive form once per layer; ``eager``: q, k and v repeated, the
      fp32 softmax and its bf16 copy (``6 heads T`` a token);
    * MLP: gate output, its SiLU and the up output (``3 a I``).

    The first layer's input needs no gradient without checkpointing (frozen embedding), so its input norm and q/k/v
    dropout masks keep nothing. With checkpointing each layer keeps its input (``a H``) and the recomputation of one
    layer counts in the backward working set. Outside the layers: the final norm (``4H + 4`` a token) and the chunked
    head (the ``M`` selected hidden states, ``a H`` each, their targets and indices) or, for ``M`` below one chunk, the
    fp32 logits. ``input_requires_grad``: whether the embedding output carries a gradient (default: with
    checkpointing, which makes peft turn it on). Returns ``{"per_layer", "first_layer", "layers", "head", "constants",
    "total", "per_token_layer", "recompute_layer"}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    h, i, q, kv, heads = (shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim, shape.num_heads)
    tokens = rows * length
    m_targets = rows * (length - 1) if targets is None else targets
    a = 4 if mode == "qlora" else weight_dtype_bytes  # residual stream
    c = compute_bytes
    lora = mode in ("qlora", "lora")
    dropout = lora and lora_dropout > 0
    m = (1 if device == "cuda" else 4) if dropout else 0  # CPU dropout keeps a fp32 mask (peft casts x to fp32)
    widths = {name: proj[1] for name, proj in shape.projections().items()}

    def lora_branch(name: str, input_needs_grad: bool = True) -> int:
        if not lora or name not in lora_targets:
            return 0
        return (m if input_needs_grad else 0) * widths[name] + c * widths[name] + c * lora_r

    norm = 4 * h + 4
    kv_saved = q if (padding and attention == "sdpa") or attention == "eager" else kv
    if attention == "sdpa":
        attn = c * (2 * q + 2 * kv_saved) + 4 * heads + (c * length if padding else 0)  # + the additive mask
    else:
        attn = c * (q + 2 * kv_saved) + (4 + (c if c < 4 else 0)) * heads * length  # fp32 softmax (+ its copy)
    mlp = 3 * a * i
    if mode == "full":  # every projection keeps its bf16 input for its weight gradient; the norms their output
        inputs = c * (h + q + h + i)  # q/k/v share one input, gate/up another
        norm_full = norm + a * h
        per_token = 2 * norm_full + inputs + attn + mlp
        first = per_token
    else:
        branches = sum(lora_branch(name) for name in PROJECTIONS)
        per_token = 2 * norm + branches + attn + mlp
        first_branches = sum(lora_branch(name, name not in ("q_proj", "k_proj", "v_proj")) for name in PROJECTIONS)
        first = per_token - branches + first_branches - norm
        if gradient_checkpointing if input_requires_grad is None else input_requires_grad:
            first = per_token
    # per layer, not per token: the autocast bf16 copies of the LoRA weights, saved by their matmuls
    # (fp32 compute: no autocast, no copies)
    weights_copies = 0 if not lora or c >= 4 else sum(c * lora_r * sum(shape.projections()[n]) for n in lora_targets)
    if gradient_checkpointing:
        per_layer = a * h * tokens  # each checkpointed layer keeps its input only
        layers = shape.num_layers * per_layer
        first_layer = per_layer
    else:
        per_layer = per_token * tokens + weights_copies
        first_layer = first * tokens + weights_copies
        layers = first_layer + (shape.num_layers - 1) * per_layer
    chunk = max(1, head_chunk_elements // shape.vocab_size)
    if m_targets > chunk:  # the chunked head keeps the selected states, the targets and the row / column indices
        head = norm * tokens + a * h * m_targets + 3 * 8 * m_targets
    else:  # one chunk: the fp32 logits of the M positions, their log-sum-exp and picked values
        head = norm * tokens + 4 * shape.vocab_size * m_targets + 2 * 4 * m_targets + 3 * 8 * m_targets
    if mode == "full":  # trained final norm, output layer and embedding: their inputs for the weight gradients
        head += a * h * tokens + 8 * tokens + (a * h * m_targets if m_targets <= chunk else 0)
    # rotary cos / sin (fp32, one position row shared by the batch) and the (B, K) response mask
    constants = 2 * 4 * length * shape.d_head + rows
    if gradient_checkpointing:  # the checkpoints keep the layers' keyword inputs: padding mask and position ids
        mask_bytes = (1 if attention == "sdpa" else a) if padding or attention == "eager" else 0
        constants += rows * length * length * mask_bytes + 8 * length
    total = layers + head + constants
    return {"per_layer": per_layer, "first_layer": first_layer, "layers": layers, "head": head,
            "constants": constants, "total": total, "per_token_layer": per_token,
            "recompute_layer": per_token * tokens + weights_copies}


def _backward_working(shape: ModelShape, act: dict, *, rows: int, length: int, targets: int, mode: str,
                      gradient_checkpointing: bool, compute_bytes: int, weight_dtype_bytes: int) -> int:
    """Modelled bytes alive on top of the saved activations while the backward runs (not measured on a CPU)."""
    tokens = rows * length
    a = 4 if mode == "qlora" else weight_dtype_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    chunk = max(1, HEAD_CHUNK_ELEMENTS // shape.vocab_size)
    head = 3 * 4 * min(chunk, targets) * shape.vocab_size + a * h * targets  # logits, their grad, softmax; d states
    stream = 2 * a * h * tokens + 3 * max(a, compute_bytes) * i * tokens  # d residual in / out, MLP gradients
    dequant = compute_bytes * max(o * n for o, n in shape.projections().values()) if mode == "qlora" else 0
    recompute = act["recompute_layer"] if gradient_checkpointing else 0
    return head + stream + dequant + recompute


def predict_step(shape: ModelShape, *, rows: int, length: int, targets: int, mode: str = "qlora",
                 gradient_checkpointing: bool = True, lora_r: int = 16, lora_targets=PROJECTIONS,
                 double_quant: bool = True, weight_dtype_bytes: int = 2, compute_bytes: int = 2,
                 **activation_settings) -> dict[str, int]:
    """Every term of one micro-step on ``rows`` sequences of ``length`` tokens (``targets`` response positions), in
    bytes: ``weights``, ``adapter``, ``gradients``, ``optimizer``, ``activations``, ``backward_working``, ``peak``.
    ``activation_settings`` go to :func:`activation_bytes` (``attention``, ``padding``, ``device``, ...)."""
    act = activation_bytes(shape, rows=rows, length=length, targets=targets, mode=mode,
                           gradient_checkpointing=gradient_checkpointing, lora_r=lora_r, lora_targets=lora_targets,
                           compute_bytes=compute_bytes, weight_dtype_bytes=weight_dtype_bytes, **activation_settings)
    working = _backward_working(shape, act, rows=rows, length=length, targets=targets, mode=mode,
                                gradient_checkpointing=gradient_checkpointing, compute_bytes=compute_bytes,
                                weight_dtype_bytes=weight_dtype_bytes)
    weights = weight_bytes(shape, mode, double_quant=double_quant, weight_dtype_bytes=weight_dtype_bytes)["total"]
    out = {"weights": weights, **_trainable(shape, mode, lora_r, lora_targets, weight_dtype_bytes),
           "activations": act["total"], "backward_working": working}
    out["peak"] = sum(out.values())
    return out


@dataclass
class Plan:
    """The planner's answer for one setting (bytes; ``*_gib`` views in :meth:`summary`)."""

    model: str
    mode: str
    k: int
    max_length: int
    per_device_batch_size: int
    gradient_checkpointing: bool
    attention: str
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    backward_working: int
    peak: int
    gpu_memory_gib: float | None = None
    usable_fraction: float = 0.9
    fits: bool | None = None
    largest_batch: int | None = None
    gradient_accumulation: int | None = None
    batch_size: int = 32
    num_processes: int = 1
    assumptions: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = asdict(self)
        for key in ("weights", "adapter", "gradients", "optimizer", "activations", "backward_working", "peak"):
            out[key + "_gib"] = round(getattr(self, key) / GIB, 3)
        return out

    def table(self) -> str:
        rows = [("weights", self.weights), ("adapter", self.adapter), ("gradients", self.gradients),
                ("optimizer states", self.optimizer), ("activations (saved for backward)", self.activations),
                ("backward working set (modelled)", self.backward_working), ("predicted peak", self.peak)]
        lines = [f"{self.model}: {self.mode}, K = {self.k} x {self.max_length} tokens, per-device batch "
                 f"{self.per_device_batch_size}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
                 f", attention {self.attention}"]
        lines += [f"  {name:<34} {value / GIB:8.2f} GiB" for name, value in rows]
        if self.gpu_memory_gib is not None:
            lines.append(f"  fits in {self.gpu_memory_gib:g} GiB x {self.usable_fraction:g}: "
                         f"{'yes' if self.fits else 'no'}")
            if self.largest_batch:
                lines.append(f"  largest per-device batch that fits: {self.largest_batch} prompts; gradient "
                             f"accumulation {self.gradient_accumulation} reaches batch {self.batch_size}"
                             + (f" on {self.num_processes} processes" if self.num_processes > 1 else ""))
            else:
                lines.append("  not even one prompt per device fits")
        lines += [f"  assumes: {text}" for text in self.assumptions]
        return "\n".join(lines)


def plan(model, *, k: int = 4, max_length: int = 1024, response_tokens: int | None = None, mode: str = "qlora",
         gradient_checkpointing: bool = True, gpu_memory_gib: float | None = None, per_device_batch_size: int = 1,
         batch_size: int = 32, num_processes: int = 1, lora_r: int = 16, lora_dropout: float = 0.05,
         lora_targets=PROJECTIONS, double_quant: bool = True, attention: str = "sdpa", padding: bool = True,
         device: str = "cuda", compute_bytes: int = 2, weight_dtype_bytes: int = 2,
         usable_fraction: float = 0.9) -> Plan:
    """Predicted peak memory of one training micro-step and, given ``gpu_memory_gib``, the largest per-device batch.

    ``model``: anything :func:`model_shape` takes. ``per_device_batch_size`` counts prompts (``K`` rows each);
    ``response_tokens``: response positions per row (default ``max_length - 1``, the most the head can see).
    ``usable_fraction`` of the GPU's memory is budgeted for tensors (the rest: the CUDA context, allocator
    fragmentation). Raises ``ValueError`` naming a bad setting.
    """
    shape = model_shape(model)
    for name, value in (("k", k), ("max_length", max_length), ("per_device_batch_size", per_device_batch_size),
                        ("batch_size", batch_size), ("num_processes", num_processes), ("lora_r", lora_r)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib must be > 0, got {gpu_memory_gib!r}")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction!r}")
    per_row = max_length - 1 if response_tokens is None else response_tokens
    if not 1 <= per_row < max_length:
        raise ValueError(f"response_tokens must be in [1, max_length), got {response_tokens!r}")

    def at(b: int) -> Plan:
        rows = b * k
        step = predict_step(shape, rows=rows, length=max_length, targets=rows * per_row, mode=mode,
                            gradient_checkpointing=gradient_checkpointing, attention=attention, padding=padding,
                            lora_r=lora_r, lora_dropout=lora_dropout, lora_targets=lora_targets, device=device,
                            compute_bytes=compute_bytes, weight_dtype_bytes=weight_dtype_bytes,
                            double_quant=double_quant)
        return Plan(model=shape.name or "model", mode=mode, k=k, max_length=max_length, per_device_batch_size=b,
                    gradient_checkpointing=gradient_checkpointing, attention=attention, weights=step["weights"],
                    adapter=step["adapter"], gradients=step["gradients"], optimizer=step["optimizer"],
                    activations=step["activations"], backward_working=step["backward_working"], peak=step["peak"],
                    batch_size=batch_size, num_processes=num_processes, usable_fraction=usable_fraction)

    result = at(per_device_batch_size)
    result.assumptions = [
        f"padded layout, every row {max_length} tokens ({per_row} response positions): the worst batch",
        "bf16 autocast (the Trainer on a GPU)" if compute_bytes == 2 else f"{compute_bytes}-byte compute dtype",
        {"sdpa": "attention sdpa, flash-style kernel (q, k, v, output, log-sum-exp; k/v repeated to all heads under "
                 "a padding mask; no T x T matrix)" if padding else
                 "attention sdpa without a padding mask (grouped k/v kept, no T x T matrix)",
         "eager": "attention eager (keeps the T x T softmax)"}[attention],
        f"dropout masks on {device} ({'1 byte' if device == 'cuda' else '4 bytes'} an element)",
        "backward working set modelled (checked only on a GPU)",
    ]
    if gpu_memory_gib is not None:
        budget = gpu_memory_gib * GIB * usable_fraction
        result.gpu_memory_gib = gpu_memory_gib
        result.fits = result.peak <= budget
        best = largest_batch(lambda b: at(b).peak, budget, batch_size=batch_size, num_processes=num_processes)
        result.largest_batch = best
        result.gradient_accumulation = batch_size // (best * num_processes) if best else None
    return result


def largest_batch(peak_of, budget: float, *, batch_size: int = 32, num_processes: int = 1) -> int | None:
    """The largest per-device batch ``b`` with ``peak_of(b) <= budget`` among those that split ``batch_size`` evenly
    over ``num_processes`` (``batch_size % (b * num_processes) == 0``, as :class:`nca_kit.config.TrainConfig`
    requires); ``None`` if not even the smallest fits. ``peak_of`` must grow with ``b``."""
    if batch_size % num_processes:
        raise ValueError(f"batch_size={batch_size} does not split over num_processes={num_processes}")
    candidates = [b for b in range(1, batch_size // num_processes + 1) if batch_size % (b * num_processes) == 0]
    best = None
    for b in candidates:  # ascending; memory grows with the batch
        if peak_of(b) > budget:
            break
        best = b
    return best


# --------------------------------------------------------------------------------------------------------------------
# Measurement (used by bench/plan_validate.py, bench/gpu_check.py and the tests)
# --------------------------------------------------------------------------------------------------------------------


class _Held:
    """What the saved-tensor hook hands autograd: alive exactly as long as autograd keeps the tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _storage_key(tensor):
    storage = tensor.untyped_storage()
    return (tensor.device.type, storage.data_ptr()), storage.nbytes()


def quantized_weight_bytes(model) -> dict:
    """Bytes of the 4-bit weights of ``model`` as bitsandbytes stores them: the packed weights plus every tensor of
    their quant states (absmax, code books, offset, nested state). ``{"packed", "quant_state", "total", "layers"}``
    (``layers``: the number of 4-bit weight matrices)."""
    seen, packed, state = set(), 0, 0
    layers = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            continue
        key, nbytes = _storage_key(weight)
        if key in seen:  # a LoRA wrapper shows its base layer's weight again
            continue
        seen.add(key)
        packed += nbytes
        layers += 1
        for tensor in _quant_state_tensors(quant_state):
            key, nbytes = _storage_key(tensor)
            if key not in seen:
                seen.add(key)
                state += nbytes
    return {"packed": packed, "quant_state": state, "total": packed + state, "layers": layers}


def _quant_state_tensors(quant_state):
    import torch

    for name in ("absmax", "code", "offset"):
        value = getattr(quant_state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested)


def _model_storages(model) -> set:
    keys = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        keys.add(_storage_key(tensor)[0])
        for extra in _quant_state_tensors(getattr(tensor, "quant_state", None) or object()):
            keys.add(_storage_key(extra)[0])
    return keys


def measure_saved_bytes(model, run, *, details: bool = False) -> dict:
    """Bytes autograd holds for the backward pass after ``run()`` (a forward) returns, measured.

    Every tensor that autograd saves goes through ``torch.autograd.graph.saved_tensors_hooks``; the hook keeps it in a
    holder that lives exactly as long as autograd keeps it, so only what is still held when ``run`` returns counts
    (tensors saved by a part of the graph that was already freed do not). Inside a non-reentrant checkpointed layer
    the checkpoint's own hook replaces this one, and the checkpoint keeps the layer's inputs instead: those are read
    from a forward pre-hook on each decoder layer and counted while alive. Storages are counted once (views share
    them); the model's own parameters, buffers and 4-bit quant states are not activations and are left out.

    Returns ``{"total", "saved", "checkpoint_inputs", "tensors", "output"}`` (bytes; ``output`` is ``run``'s return);
    ``details``: also ``"list"``, ``(bytes, shape, dtype)`` of each counted storage.
    """
    import torch

    from nca_kit.packing import _decoder

    model_keys = _model_storages(model)
    held: list[weakref.ref] = []
    inputs: list[weakref.ref] = []

    def pack(tensor):
        holder = _Held(tensor)
        held.append(weakref.ref(holder))
        return holder

    def keep_inputs(module, args, kwargs):
        for value in list(args) + list(kwargs.values()):
            for tensor in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(tensor, torch.Tensor):
                    inputs.append(weakref.ref(tensor))

    decoder = _decoder(model)
    layers = list(getattr(decoder, "layers", [])) if decoder is not None else []
    handles = [layer.register_forward_pre_hook(keep_inputs, with_kwargs=True) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            output = run()
    finally:
        for handle in handles:
            handle.remove()
    counted: dict = {}
    saved = 0
    for ref in held:
        holder = ref()
        if holder is None or not isinstance(holder.tensor, torch.Tensor):
            continue
        key, nbytes = _storage_key(holder.tensor)
        if key not in model_keys and key not in counted:
            counted[key] = (nbytes, tuple(holder.tensor.shape), str(holder.tensor.dtype))
            saved += nbytes
    checkpoint_inputs = 0
    for ref in inputs:
        tensor = ref()
        if tensor is None:
            continue
        key, nbytes = _storage_key(tensor)
        if key not in model_keys and key not in counted:
            counted[key] = (nbytes, tuple(tensor.shape), str(tensor.dtype))
            checkpoint_inputs += nbytes
    out = {"total": saved + checkpoint_inputs, "saved": saved, "checkpoint_inputs": checkpoint_inputs,
           "tensors": len(counted), "output": output}
    if details:
        out["list"] = list(counted.values())
    return out


def count_state_bytes(model, optimizer=None) -> dict:
    """Bytes of the model's tensors by role, counted from the tensors: frozen weights (with 4-bit quant states),
    trainable parameters, their gradients, and the optimizer's states. Storages counted once."""
    seen: set = set()

    def add(tensor) -> int:
        key, nbytes = _storage_key(tensor)
        if key in seen:
            return 0
        seen.add(key)
        return nbytes

    out = {"weights": 0, "adapter": 0, "gradients": 0, "optimizer": 0}
    for param in model.parameters():
        if param.requires_grad:
            out["adapter"] += add(param)
        else:
            out["weights"] += add(param)
            for extra in _quant_state_tensors(getattr(param, "quant_state", None) or object()):
                out["weights"] += add(extra)
    for buffer in model.buffers():
        out["weights"] += add(buffer)
    for param in model.parameters():
        if param.grad is not None:
            out["gradients"] += add(param.grad)
    if optimizer is not None:
        import torch

        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    out["optimizer"] += add(value)
    return out


def save_random_model(shape: ModelShape, folder, *, seed: int = 0, dtype: str = "bfloat16",
                      device: str = "cpu") -> Path:
    """A randomly initialised Mistral of ``shape`` saved to ``folder`` (safetensors, with the tiny tokenizer's files
    so :func:`nca_kit.models.load_model` reads it like any model folder). Random weights: for memory and speed only."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from nca_kit.models import save_model_folder, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = MistralConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                           intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                           num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                           head_dim=shape.d_head, max_position_embeddings=shape.max_position_embeddings or 4096,
                           sliding_window=None, tie_word_embeddings=shape.tie_word_embeddings,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # a GPU initialises a 7B model in seconds
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    save_model_folder(model, tokenizer, folder)  # written by every process (save_pretrained: rank 0 only)
    del model
    return folder


def synthetic_batch(*, prompts: int, k: int, length: int, prompt_length: int, vocab_size: int, pad_token_id: int,
                    padding: bool = True, seed: int = 0) -> dict:
    """A :class:`nca_kit.logps.RewardCollator` batch of ``prompts`` x ``k`` rows of ``length`` tokens (random ids): the
    padded layout at full length. ``padding``: the last response of each prompt is 8 tokens shorter, so the batch
    carries a padding mask as real batches do."""
    import torch

    from nca_kit.logps import RewardCollator

    generator = torch.Generator().manual_seed(seed)
    low = 4  # above the tiny tokenizer's special ids

    def ids(n):
        return torch.randint(low, vocab_size, (n,), generator=generator).tolist()

    features = []
    for _ in range(prompts):
        lengths = [length - prompt_length - (8 if padding and j == k - 1 else 0) for j in range(k)]
        features.append({"prompt_input_ids": ids(prompt_length), "response_input_ids": [ids(n) for n in lengths],
                         "rewards": [float(j) for j in range(k)]})
    return RewardCollator(pad_token_id)(features)


def load_for_step(folder, *, mode: str = "qlora", gradient_checkpointing: bool = True, device: str = "cpu",
                  attention: str = "sdpa", lora_r: int = 16, compute_dtype: str = "bfloat16"):
    """The model as :func:`nca_kit.training.prepare_model` loads it for a run (QLoRA / LoRA / full, checkpointing),
    with ``attention`` as its attention kernel. ``compute_dtype="bfloat16"``: the forward under bf16 autocast, as
    accelerate wraps it for the Trainer's ``bf16=True`` on a GPU; ``"float32"``: no autocast, fp32 matmuls (the
    kit's QLoRA on a CPU without native bf16). Returns the model in training mode."""
    import functools

    import torch

    from nca_kit.models import LoraSettings, load_model

    model, _ = load_model(str(folder), device=device, quantize_4bit=mode == "qlora",
                          lora=LoraSettings(r=lora_r) if mode != "full" else None,
                          gradient_checkpointing=gradient_checkpointing,
                          dtype=torch.bfloat16 if compute_dtype == "bfloat16" else torch.float32,
                          compute_dtype=getattr(torch, compute_dtype))
    model.set_attn_implementation(attention)
    if compute_dtype == "bfloat16":
        forward = model.forward
        model.forward = functools.wraps(forward)(torch.autocast(torch.device(device).type, dtype=torch.bfloat16)(forward))
    return model.train()


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nca_kit.plan",
        description="Will this run fit on the GPU, and how should it be batched? Predicted peak memory of one "
                    "training micro-step, split into weights, adapter, gradients, optimizer states and activations.")
    parser.add_argument("--model", default="mistral-7b-sft-beta",
                        help="a named shape (" + ", ".join(NAMED_SHAPES) + "), a folder with config.json, a "
                             "config.json file, or a hub id in the local cache (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per row (default: %(default)s)")
    parser.add_argument("--response-tokens", type=int, default=None,
                        help="response positions per row (default: max_length - 1, the worst case)")
    parser.add_argument("--mode", choices=MODES, default="qlora")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="GPU memory in GiB (80 GB H100 = 79.2 GiB as reported; 141 GB H200 = 139.8 GiB)")
    parser.add_argument("--per-device-batch-size", type=int, default=1, help="prompts per forward (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per optimizer step (App. C: 32)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--attention", choices=ATTENTION_KERNELS, default="sdpa")
    parser.add_argument("--no-double-quant", action="store_true", help="NF4 absmax values in fp32")
    parser.add_argument("--usable-fraction", type=float, default=0.9,
                        help="share of the GPU memory budgeted for tensors (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = plan(args.model, k=args.k, max_length=args.max_length, response_tokens=args.response_tokens,
                      mode=args.mode, gradient_checkpointing=args.gradient_checkpointing == "on",
                      gpu_memory_gib=args.gpu_memory_gib, per_device_batch_size=args.per_device_batch_size,
                      batch_size=args.batch_size, num_processes=args.num_processes, lora_r=args.lora_r,
                      attention=args.attention, double_quant=not args.no_double_quant,
                      usable_fraction=args.usable_fraction)
    except (ValueError, LookupError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary(), indent=2) if args.json else result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
