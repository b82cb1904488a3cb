"""Every file in ``configs/accelerate/`` is a real accelerate config: it loads, passes ``accelerate launch``'s own
validation, yields the environment its launcher would hand the workers (FSDP and DeepSpeed settings included), and
splits the paper's batch of 32 prompts into per-device batch x processes x accumulation exactly.

No GPU is needed: accelerate validates a config and prepares the launch environment without starting processes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from nca_kit import training
from nca_kit.training import TrainConfig, build_training_arguments

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
# per-device batch (prompts per forward) a user would pick for each setup; the kit derives the accumulation.
PER_DEVICE = {"cpu_2proc": 2, "ddp_lora": 2, "fsdp_full_shard": 1, "fsdp_qlora": 2, "deepspeed_zero3": 1,
              "multi_node_ddp": 2}


def test_every_config_is_listed():
    assert {p.stem for p in CONFIGS} == set(PER_DEVICE), "add the new config to PER_DEVICE (and the README)"


def _launch_args(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # the DeepSpeed config names its JSON relative to the repository root
    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "nca_kit.train", "--config", "configs/tiny_cpu.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_validates_and_prepares_the_launch(path, monkeypatch):
    config = load_config_from_file(str(path))
    assert config.num_processes % config.num_machines == 0, "processes must split evenly over the machines"
    args, defaults = _launch_args(path, monkeypatch)
    assert args.num_processes == config.num_processes
    kind = defaults.distributed_type
    if kind == DistributedType.DEEPSPEED:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `launch_command`
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        ds_file = Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        assert (REPO / ds_file).is_file() or ds_file.is_file()
    elif kind in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        if kind == DistributedType.FSDP:
            assert env["ACCELERATE_USE_FSDP"] == "true"
            assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
            assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "MistralDecoderLayer"
            # QLoRA + FSDP needs use_orig_params off; full fine-tuning with LoRA-free params may keep it on.
            assert env["FSDP_USE_ORIG_PARAMS"] == ("false" if "qlora" in path.stem else "true")
        if config.num_machines > 1:
            assert args.nnodes == "2" and args.nproc_per_node == "8"
    else:
        assert kind == DistributedType.MULTI_CPU and config.use_cpu


def test_fsdp_settings_build_the_plugin(monkeypatch):
    """The FSDP variables the launcher sets are ones accelerate's plugin accepts (a typo'd strategy would fail)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    for path in (CONFIG_DIR / "fsdp_full_shard.yaml", CONFIG_DIR / "fsdp_qlora.yaml"):
        args, _ = _launch_args(path, monkeypatch)
        for key, value in prepare_multi_gpu_env(args).items():
            if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
                monkeypatch.setenv(key, value)
        # Syncing module states needs a GPU to broadcast from; everything else is built and checked from the env.
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
        plugin = FullyShardedDataParallelPlugin()
        assert "FULL_SHARD" in str(plugin.sharding_strategy)
        assert plugin.use_orig_params is ("qlora" not in path.stem)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_batch_arithmetic(path, monkeypatch):
    """batch_size 32 (Appendix C) = per-device batch x processes x accumulation, for every config."""
    world = load_config_from_file(str(path)).num_processes
    per_device = PER_DEVICE[path.stem]
    monkeypatch.setattr(training, "_world_size", lambda: world)
    config = TrainConfig(batch_size=32, per_device_batch_size=per_device, output_dir=str(path.parent / "unused"))
    args = build_training_arguments(config)
    assert args.per_device_train_batch_size * world * args.gradient_accumulation_steps == 32


def test_batch_that_does_not_split_is_refused(monkeypatch):
    monkeypatch.setattr(training, "_world_size", lambda: 3)
    with pytest.raises(ValueError, match="not a multiple"):
        build_training_arguments(TrainConfig(batch_size=32, per_device_batch_size=2, output_dir="unused"))


def test_deepspeed_json_fills_auto_values_from_the_kit():
    cfg = json.loads((CONFIG_DIR / "ds_zero3.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    autos = [k for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
             if cfg[k] == "auto"]
    assert len(autos) == 3, "batch sizes must stay 'auto' so the kit's TrainConfig decides them"
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (pip install --no-build-isolation deepspeed): 'auto' fill not checked")
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(cfg)
    hf.trainer_config_process(TrainingArguments(output_dir="unused", per_device_train_batch_size=2,
                                                gradient_accumulation_steps=2, use_cpu=True, report_to="none"))
    assert hf.is_zero3()
    assert hf.config["train_micro_batch_size_per_gpu"] == 2 and hf.config["gradient_accumulation_steps"] == 2
    assert hf.config["train_batch_size"] == 2 * 2  # x world size 1 here


def test_qlora_loader_stores_4bit_weights_as_bf16_and_leaves_placement_to_fsdp(monkeypatch):
    """QLoRA + FSDP (configs/accelerate/fsdp_qlora.yaml) needs the packed 4-bit weights stored in FSDP's dtype and no
    per-process device map; the launcher's environment is what the loader reads."""
    import torch

    from nca_kit import models

    config = models.qlora_quantization_config(double_quant=True)
    assert config.bnb_4bit_quant_storage == torch.bfloat16
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    args, _ = _launch_args(CONFIG_DIR / "fsdp_qlora.yaml", monkeypatch)
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    assert models._under_fsdp()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not models._under_fsdp()
