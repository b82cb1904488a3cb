"""The training config: :class:`TrainConfig` (paper Appendix C defaults), its YAML / command-line round trip and the
value coercion behind ``--key value`` overrides.

A module of its own so that reading and validating a config (``python -m nca_kit.train --help``, a config error)
needs no ``torch``, ``transformers``, ``peft`` or ``datasets`` import (the loss check imports :mod:`nca_kit.losses`
when a config is built).
:mod:`nca_kit.training` re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "coerce_value", "DATA_KINDS", "FORWARD_LAYOUTS", "REFERENCE_MODES", "NOT_RESULT_KEYS",
           "RESUME_MAY_CHANGE", "result_settings", "run_identity"]

#: What the training rows are: "reward" (K scored responses), "pairwise" (chosen / rejected), "auto" (from the data).
DATA_KINDS = ("auto", "reward", "pairwise")
#: How the log-prob forward lays out the K responses of a prompt (:mod:`nca_kit.packing`).
FORWARD_LAYOUTS = ("padded", "packed", "shared_prompt", "tree", "auto")
REFERENCE_MODES = ("cached", "per_step")


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """All settings of a training run. Defaults reproduce the paper's UltraFeedback setup (Appendix C)."""

    # --- model
    model_name: str = "HuggingFaceH4/mistral-7b-sft-beta"  # Sec. 5 / App. C: Mistral-7B SFT (Zephyr-beta's SFT)
    use_lora: bool = True  # App. C: LoRA fine-tuning (the official scripts use QLoRA)
    lora_r: int = 16  # App. C: LoRA rank 16
    lora_alpha: int = 16  # App. C: LoRA alpha 16
    lora_dropout: float = 0.05  # App. C: LoRA dropout 0.05
    lora_target_modules: tuple[str, ...] = (  # App. C: all attention and MLP projections
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    quantize_4bit: bool = False  # QLoRA (4-bit NF4 base, bitsandbytes: GPU or CPU); official scripts: on
    double_quant: bool = True  # QLoRA double quantisation (used with quantize_4bit)
    compute_dtype: str | None = None  # QLoRA matmul dtype; None: bf16 where the device has it, else float32
    gradient_checkpointing: bool = False  # trade compute for memory (7B on one 24-48 GB GPU: turn on)
    bf16: bool | None = None  # App. C: bfloat16 on GPU; None = automatic (bf16 on a GPU that has it, else fp32)

    # --- data
    dataset: str = "ChenDRAG/ultrafeedback_reward"  # Sec. 5.1: UltraFeedback, K = 4 GPT-4-scored responses
    dataset_layout: str | None = "nca_reward"  # None: a local canonical .jsonl/.json; else a nca_kit.data layout
    dataset_split: str = "train_prefs"  # split read from a hub dataset
    data_kind: str = "auto"  # "reward" / "pairwise"; auto: from the layout or the file's columns
    max_train_samples: int | None = None  # keep only the first N prompts (smoke runs); None = all
    on_invalid: str = "raise"  # an invalid data row: "raise" (named, before training) or "skip" (dropped, counted)
    max_prompt_length: int = 512  # App. C / DPO recipe: prompt keeps its last 512 tokens
    max_length: int = 1024  # App. C / DPO recipe: prompt + response <= 1024 tokens
    overflow: str = "error"  # a prompt leaving no room for a response: "error" or "skip" (counted, warned)

    # --- loss
    loss_type: str = "nca"  # reward data: infonca / nca / dpo_best_vs_rest / dpo_all_pairs; pairs: dpo/nca/ipo/infonca
    alpha: float = 0.01  # App. C: reward temperature alpha = 0.01 (ignored for pairwise data: alpha -> 0)
    beta: float = 0.01  # App. C: implicit-reward scale beta = 0.01
    average_logps: bool = False  # paper: summed token log-probs; True = mean over response tokens
    reference: str = "cached"  # "cached": log mu computed once before training; "per_step": every step
    logps_forward: str = "auto"  # per batch the cheapest of padded / packed / tree; or one of them, or "shared_prompt"

    # --- optimisation
    learning_rate: float = 5e-6  # App. C: 5e-6
    num_train_epochs: float = 1.0  # App. C: 1 epoch
    max_steps: int = -1  # > 0 overrides num_train_epochs
    batch_size: int = 32  # App. C: effective batch 32 prompts per optimizer step (all GPUs x accumulation)
    per_device_batch_size: int = 2  # prompts per forward pass on each device; accumulation makes up the rest
    optim: str = "adamw_torch"  # App. C: AdamW
    weight_decay: float = 0.0  # Zephyr / DPO recipes: no weight decay
    lr_scheduler_type: str = "cosine"  # App. C: cosine schedule
    warmup_ratio: float = 0.1  # App. C: warmup over the first 10% of steps
    max_grad_norm: float = 1.0  # Trainer default (gradient clipping at 1.0)
    seed: int = 42  # Trainer default seed

    # --- bookkeeping
    output_dir: str = "runs/paper_ultrafeedback_nca"  # adapter, metrics.jsonl, config.yaml, trends.png
    overwrite_output_dir: bool = False  # a fresh run into a folder holding another run: replace it (else refused)
    logging_steps: int = 1  # log every optimizer step
    save_steps: int = 0  # checkpoint every N steps (0 = only the final adapter)
    save_total_limit: int | None = 2  # keep at most N checkpoints
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" for the newest in output_dir
    group_by_length: bool = True  # batch prompts of similar token count (less padding)
    reference_batch_size: int | None = None  # prompts per forward when caching log mu; None = per_device_batch_size
    reference_chunk_rows: int = 2048  # prompts per cached chunk of log mu (an interrupted pass resumes by chunk)
    dataloader_num_workers: int = 0
    report_to: str = "none"  # "wandb", "tensorboard", ... (Trainer integrations)
    disable_tqdm: bool = False
    save_figure: bool = True  # write trends.png (loss, likelihood change, implicit rewards) at the end

    def __post_init__(self):
        self.lora_target_modules = tuple(self.lora_target_modules) if isinstance(self.lora_target_modules,
                                                                                  (list, tuple)) \
            else self.lora_target_modules
        self.validate()

    def validate(self) -> None:
        """Check every setting before any work; a ``ValueError`` names the key. The one place a run's settings are
        checked: types first, then each value's range, then the settings that must agree with each other."""
        from nca_kit.losses import check_loss_type  # torch: not needed to parse the command line

        _check_types(self)
        self.loss_type = check_loss_type(self.loss_type)
        choices = {"data_kind": DATA_KINDS, "reference": REFERENCE_MODES, "logps_forward": FORWARD_LAYOUTS,
                   "overflow": ("error", "skip"), "on_invalid": ("raise", "skip"),
                   "compute_dtype": (None, "bfloat16", "float16", "float32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                what = f"{allowed[0]!r} or {allowed[1]!r}" if len(allowed) == 2 else f"one of {allowed}"
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        for name in ("batch_size", "per_device_batch_size", "max_prompt_length", "max_length", "logging_steps",
                     "reference_chunk_rows", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("reference_batch_size", "save_total_limit", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, or None ({_NONE_MEANS[name]}), got {value!r}")
        for name in ("save_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        # numbers: (lowest, lowest allowed itself, highest or None, highest allowed itself)
        ranges = {"alpha": (0, True, None, False), "beta": (0, False, None, False),
                  "learning_rate": (0, False, None, False), "weight_decay": (0, True, None, False),
                  "max_grad_norm": (0, True, None, False), "num_train_epochs": (0, False, None, False),
                  "lora_dropout": (0, True, 1, False), "warmup_ratio": (0, True, 1, False),
                  "lora_alpha": (0, False, None, False)}
        for name, (low, low_ok, high, high_ok) in ranges.items():
            value = getattr(self, name)
            ok = math.isfinite(value) and (value >= low if low_ok else value > low) and (
                high is None or (value <= high if high_ok else value < high))
            if not ok:
                bound = (">= " if low_ok else "> ") + str(low)
                if high is not None:
                    bound = f"in [{low}, {high})" if low_ok else f"in ({low}, {high})"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}")
        for name in ("model_name", "dataset", "output_dir", "optim", "lr_scheduler_type", "dataset_split"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty (got {getattr(self, name)!r})")
        if self.resume_from_checkpoint is not None and not self.resume_from_checkpoint.strip():
            raise ValueError("resume_from_checkpoint must be a checkpoint folder, 'latest' or None, got ''")
        if self.use_lora and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module when use_lora is true")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be >= 1, or -1 to train num_train_epochs, got {self.max_steps!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if self.batch_size % self.per_device_batch_size:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of per_device_batch_size="
                             f"{self.per_device_batch_size}")

    # -- dict / YAML round trip ---------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping; keys may use dots (``lora.r`` = ``lora_r``); values are coerced to field types."""
        coerced = {}
        for key, value in values.items():
            name = _field_key(key)
            coerced[name] = coerce_value(name, value)
        return cls(**coerced)

    @classmethod
    def from_yaml(cls, path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read a YAML recipe, apply ``overrides`` (same rules as :meth:`from_dict`) and validate."""
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must be a mapping of keys to values")
        values = {_field_key(k): v for k, v in values.items()}
        for k, v in (overrides or {}).items():
            values[_field_key(k)] = v
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora_target_modules"] = list(self.lora_target_modules)
        return out

    def to_yaml(self, path=None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{_field_key(k): coerce_value(_field_key(k), v) for k, v in changes.items()})


_NONE_MEANS = {"reference_batch_size": "per_device_batch_size", "save_total_limit": "keep every checkpoint",
               "max_train_samples": "all prompts"}


def _check_types(config: TrainConfig) -> None:
    """Every field holds a value of its declared type (an int where a float is declared is fine; a bool is never
    a number); the error names the key."""
    hints = typing.get_type_hints(TrainConfig)
    for name in TrainConfig.field_names():
        value, hint = getattr(config, name), hints[name]
        if not _is_instance(value, hint):
            raise ValueError(f"{name} must be of type {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _is_instance(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return "None" if hint is type(None) else hint.__name__


# --------------------------------------------------------------------------------------------------------------------
# Run identity: which settings make a run's result
# --------------------------------------------------------------------------------------------------------------------

#: Settings that never change what a run computes: where it writes, how often it logs and saves, progress bars,
#: how the cached reference pass is batched (its numbers are the same), and the resume / overwrite switches
#: themselves. They are not part of a run's identity.
NOT_RESULT_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "save_steps",
                   "save_total_limit", "disable_tqdm", "report_to", "dataloader_num_workers", "save_figure",
                   "reference_batch_size", "reference_chunk_rows")

#: Result settings that a resumed run may still change: the run's length (``max_steps``, ``num_train_epochs``;
#: never below the checkpoint's step; the learning-rate schedule then follows the new length from the checkpoint
#: on) and the memory knobs that leave the maths alone (``per_device_batch_size``: same global ``batch_size``,
#: another accumulation split; ``gradient_checkpointing``). Any other difference from the checkpoint's settings is
#: refused, naming the keys.
RESUME_MAY_CHANGE = ("max_steps", "num_train_epochs", "per_device_batch_size", "gradient_checkpointing")


def result_settings(config: TrainConfig | dict) -> dict:
    """The settings of ``config`` that change a run's result (every key but :data:`NOT_RESULT_KEYS`)."""
    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    return {k: values[k] for k in sorted(values) if k not in NOT_RESULT_KEYS}


def run_identity(config: TrainConfig | dict) -> str:
    """A run's identity: the hash of :func:`result_settings` (16 hex digits)."""
    import hashlib
    import json

    text = json.dumps(result_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _field_key(key: str) -> str:
    name = str(key).replace(".", "_").replace("-", "_")
    valid = TrainConfig.field_names()
    if name not in valid:
        raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
    return name


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce_value(name: str, value: Any) -> Any:
    """Convert ``value`` (often a string from the command line) to the type of config field ``name``."""
    hints = typing.get_type_hints(TrainConfig)
    return _coerce(name, value, hints[name])


def _coerce(name: str, value: Any, hint) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{name}: cannot parse {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            import yaml

            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} expects a list, got {value!r}")
        return tuple(str(v).strip() for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ValueError(f"{name} expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} expects an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"{name} expects an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} expects a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} expects a string, got {value!r}")
        return str(value)
    return value
