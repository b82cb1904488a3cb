"""The ``paper_shape`` scale (``nca_kit.reproduce``): the paper's recipe unchanged, only the size reduced.

The fast tests check the split: every training setting of ``paper_shape`` equals the paper's except the size keys,
and the notebook overrides (a local model folder, a data file) replace the scale's sources. The end-to-end test runs
the paper-scale steps of notebooks 30 and 31 on the Mistral-7B-wide 2-layer model on CPU: QLoRA load, training
with checkpointing and the cached reference, the answer files, the KL hook, lm-eval and the record. It takes
several minutes on 2 shared cores (model build, NF4 loading, a step at 4096 / 14336 widths), longer than `make test`
can hold, so it is marked ``paper_shape`` and runs only when asked for::

    python -m pytest tests/test_paper_shape.py -m paper_shape
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from nca_kit import reproduce

SIZE_KEYS = {"max_prompt_length", "max_length", "batch_size", "per_device_batch_size", "max_steps", "save_steps"}


@pytest.mark.parametrize("recipe", ["paper_ultrafeedback_nca", "paper_ultrainteract_nca"])
def test_paper_shape_keeps_the_paper_recipe_and_changes_only_the_size(recipe, tmp_path):
    assert set(reproduce.SCALES["paper_shape"]["overrides"]) == SIZE_KEYS
    paper = asdict(reproduce.train_config("paper", recipe, model="m", loss_type="nca", run_dir=tmp_path))
    shape = asdict(reproduce.train_config("paper_shape", recipe, model="m", loss_type="nca", run_dir=tmp_path))
    differ = {k for k in paper if paper[k] != shape[k]}
    assert differ <= SIZE_KEYS | {"dataset", "dataset_layout", "dataset_split"}, differ
    assert shape["quantize_4bit"] and shape["double_quant"] and shape["gradient_checkpointing"]
    assert (shape["lora_r"], shape["lora_alpha"], shape["lora_dropout"]) == (16, 16, 0.05)
    assert shape["batch_size"] % shape["per_device_batch_size"] == 0 and shape["batch_size"] > shape[
        "per_device_batch_size"], "the batch is still reached by accumulation"


def test_overrides_replace_the_scale_sources(tmp_path):
    assert reproduce.model_source("paper") == "HuggingFaceH4/mistral-7b-sft-beta"  # hub ids stay the paper's
    assert reproduce.model_source("paper", str(tmp_path)) == str(tmp_path)
    assert reproduce.model_source("paper_shape", str(tmp_path), reasoning=True) == str(tmp_path)
    assert reproduce.reward_data("paper")[0] == "ChenDRAG/ultrafeedback_reward"
    assert reproduce.reward_data("paper", "x.jsonl") == ("x.jsonl", "auto", "train")
    assert reproduce.pair_data("paper_shape", "y.jsonl") == ("y.jsonl", "auto", "train")


@pytest.mark.paper_shape
@pytest.mark.slow
def test_paper_shape_runs_every_paper_scale_step_on_cpu(tmp_path, request):
    if "paper_shape" not in (request.config.option.markexpr or ""):
        pytest.skip("takes several minutes: run with -m paper_shape")
    import bitsandbytes as bnb
    import torch
    import yaml

    from nca_kit import benchmarks
    from nca_kit.models import can_quantize_4bit
    from nca_kit.training import train

    ok, why = can_quantize_4bit("cpu")
    if not ok:
        pytest.skip(f"4-bit NF4 cannot run on this CPU: {why}")
    torch.set_num_threads(1)
    folder = reproduce.model_source("paper_shape")
    rows, loss_type = reproduce.method_rows("paper_shape", "nca", k=4, limit=2)
    config = reproduce.train_config("paper_shape", "paper_ultrafeedback_nca", model=folder, loss_type=loss_type,
                                    run_dir=tmp_path / "nca")
    result = train(config, dataset=rows)
    model = result.model
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # every projection of both layers, at Mistral-7B's widths
    q_proj = model.get_submodule([n for n in quantised if n.endswith("q_proj.base_layer")][0])
    assert q_proj.weight.quant_state.shape == torch.Size([4096, 4096])
    assert model.get_output_embeddings().weight.shape == (32000, 4096)  # head and embeddings stay unquantised
    saved = yaml.safe_load((tmp_path / "nca" / "config.yaml").read_text())
    assert saved["quantize_4bit"] and saved["gradient_checkpointing"] and saved["reference"] == "cached"
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "nca" / "adapter_model.safetensors").is_file()

    evaluation = reproduce.evaluate_alignment(model, result.tokenizer, "paper_shape", tmp_path / "nca",
                                              model_id="paper-shape-nca", limit=1)
    assert evaluation["n_mt_bench"] == 1 and evaluation["n_alpaca_eval"] == 1
    assert benchmarks.validate_answer_file(Path(evaluation["mt_bench_file"])) == 1
    assert abs(evaluation["kl"]) < 1.0  # two steps at lr 5e-6 (the first in warmup at 0) barely move the policy
    include = reproduce.arith_task_folder(tmp_path / "lm_eval")
    scores = reproduce.evaluate_reasoning(model, result.tokenizer, "paper_shape", include_path=include, limit=1)
    assert 0.0 <= scores["nca_kit_arith"]["exact_match,flexible-extract"] <= 1.0
    record = reproduce.write_record(tmp_path / "nca", {"losses": result.losses, **evaluation})
    assert record["mt_bench_file"] == "answers/model_answer/paper-shape-nca.jsonl"
