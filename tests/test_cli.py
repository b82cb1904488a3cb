"""``python -m nca_kit.train`` end to end on the tiny model, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nca_kit.train import build_config, main, parse_overrides

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
FIXTURE = str(REPO / "tests" / "fixtures" / "tiny_reward.jsonl")


def cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "nca_kit.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_trains_and_writes_adapter_metrics_config_figure(tmp_path):
    out = tmp_path / "run"
    proc = cli("--config", TINY, "--output_dir", str(out), "--dataset", FIXTURE, "--max_steps", "2",
               "--loss_type=infonca")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained 2 steps on 12 prompts" in proc.stdout
    assert "is_gradient_checkpointing" not in proc.stderr, "a library FutureWarning the user cannot act on"
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "config.yaml", "trends.png"):
        assert (out / name).is_file(), name
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert {"rewards/A0", "logps/chosen", "logps/chosen_delta", "rewards/accuracy", "kl"} <= set(steps[0])
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["loss_type"] == "infonca" and saved["model_name"] == "tiny-mistral"


def test_unknown_key_lists_valid_keys(capsys):
    with pytest.raises(SystemExit) as info:
        build_config(["--config", TINY, "--lora_rank", "8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'lora_rank'" in err and "lora_r" in err


def test_missing_model_is_one_line_error(tmp_path, capsys):
    code = main(["--config", TINY, "--dataset", FIXTURE, "--output_dir", str(tmp_path / "a"),
                 "--model_name", str(tmp_path / "missing-model")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: model folder") and "does not exist" in err and "Traceback" not in err


def test_4bit_where_bitsandbytes_cannot_run_is_one_line_error(tmp_path, capsys, monkeypatch):
    from nca_kit import models

    monkeypatch.setattr(models, "_probe_4bit", lambda device_type: f"no 4-bit kernels for device {device_type!r}")
    code = main(["--config", TINY, "--dataset", FIXTURE, "--output_dir", str(tmp_path), "--quantize_4bit", "true"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: quantize_4bit=True cannot run on ") and "Traceback" not in err


def test_override_parsing_in_process():
    assert parse_overrides(["--a", "1", "--b=x", "--flag", "--lora.r", "4"]) == {"a": "1", "b": "x", "flag": "true",
                                                                                "lora.r": "4"}
    config = build_config(["--config", TINY, "--lora.r", "4", "--bf16", "false", "--max_train_samples", "none"])
    assert config.lora_r == 4 and config.bf16 is False and config.max_train_samples is None
    with pytest.raises(SystemExit):
        build_config(["--config", TINY, "--learning_rate", "fast"])


def test_help_and_config_errors_do_not_import_the_training_stack():
    # --help and a bad value answer in well under a second: nothing heavy is imported before the config is valid.
    code = (
        "import sys, nca_kit.train as t\n"
        "try:\n"
        "    t.build_config(['--config', 'configs/tiny_cpu.yaml', '--alpha', 'abc'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'datasets', "
        "'bitsandbytes'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"heavy modules imported before the config was read: {out.stdout}"
    assert "alpha expects a number, got 'abc'" in out.stderr


def test_optional_cpu_kernel_notice_of_bitsandbytes_is_dropped_and_others_pass():
    import logging

    import nca_kit  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["some other bitsandbytes warning"]


# issue 24, item 7: every setting checked before any work, the key named

BAD_SETTINGS = [("beta", "-1"), ("beta", "nan"), ("alpha", "-0.5"), ("alpha", "nan"), ("learning_rate", "-1e-5"),
                ("learning_rate", "nan"), ("reference_batch_size", "-1"), ("weight_decay", "nan"), ("output_dir", ""),
                ("num_train_epochs", "0"), ("max_grad_norm", "inf"), ("lora_dropout", "1.5"), ("seed", "-1"),
                ("save_steps", "-2"), ("save_total_limit", "0"), ("warmup_ratio", "1"), ("lora_r", "0"),
                ("per_device_batch_size", "3"), ("resume_from_checkpoint", " ")]


@pytest.mark.parametrize("key,value", BAD_SETTINGS, ids=[f"{k}={v}" for k, v in BAD_SETTINGS])
def test_a_bad_setting_is_refused_before_any_work_naming_the_key(tmp_path, capsys, key, value):
    out = tmp_path / "run"
    args = ["--config", TINY, f"--{key}={value}"] + ([] if key == "output_dir" else ["--output_dir", str(out)])
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "error: " in err and key in err.split("error: ")[1] and "Traceback" not in err
    assert not out.exists()


def test_a_setting_changed_after_the_config_was_built_is_checked_again(tmp_path):
    from nca_kit.training import TrainConfig, train

    config = TrainConfig.from_yaml(TINY, {"output_dir": str(tmp_path / "run")})
    config.beta = float("nan")
    with pytest.raises(ValueError, match="beta must be a finite number"):
        train(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="weight_decay must be of type float"):
        TrainConfig(weight_decay="0.1")


def test_summary_counts_optimizer_steps_not_logged_rows(tmp_path, capsys):
    assert main(["--config", TINY, "--output_dir", str(tmp_path / "run"), "--logging_steps", "3",
                 "--save_figure", "false"]) == 0
    assert "trained 4 steps on 12 prompts" in capsys.readouterr().out


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_exit_130(tmp_path, capsys, monkeypatch):
    from nca_kit.training import NCATrainer

    original = NCATrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NCATrainer, "training_step", interrupted)
    out = tmp_path / "run"
    code = main(["--config", TINY, "--output_dir", str(out), "--save_steps", "2", "--save_figure", "false"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"resume from {out / 'checkpoint-2'}" in err and "--resume_from_checkpoint latest" in err
