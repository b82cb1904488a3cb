"""The training config: :class:`TrainConfig` (paper Appendix C defaults), its YAML / command-line round trip and the
value coercion behind ``--key value`` overrides.

A module of its own so that reading and validating a config (``python -m nca_kit.train --help``, a config error)
needs no ``torch``, ``transformers``, ``peft`` or ``datasets`` import (the loss check imports :mod:`nca_kit.losses`
when a config is built).
:mod:`nca_kit.training` re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "coerce_value", "DATA_KINDS", "FORWARD_LAYOUTS", "REFERENCE_MODES"]

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
        from nca_kit.losses import check_loss_type  # torch: not needed to parse the command line

        self.lora_target_modules = tuple(self.lora_target_modules)
        self.loss_type = check_loss_type(self.loss_type)
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"data_kind must be one of {DATA_KINDS}, got {self.data_kind!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.logps_forward not in FORWARD_LAYOUTS:
            raise ValueError(f"logps_forward must be one of {FORWARD_LAYOUTS}, got {self.logps_forward!r}")
        if self.compute_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16, float16, float32 or None, got {self.compute_dtype!r}")
        if self.overflow not in ("error", "skip"):
            raise ValueError(f"overflow must be 'error' or 'skip', got {self.overflow!r}")
        for name in ("batch_size", "per_device_batch_size", "max_prompt_length", "max_length", "logging_steps",
                     "reference_chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.on_invalid not in ("raise", "skip"):
            raise ValueError(f"on_invalid must be 'raise' or 'skip', got {self.on_invalid!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be >= 1, or -1 to train num_train_epochs, got {self.max_steps!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1, or None for all prompts, got {self.max_train_samples!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if not (0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")

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
