r"""The paper's runs at any scale, one code path: data adapter → trainer → evaluation hooks → record (notebooks 30, 31).

A *scale* (:data:`SCALES`) fixes the model, the data, the training recipe and the evaluation sets; the steps do not
change with it:

1. the data through the kit's adapters (:func:`nca_kit.data.load_reward_dataset` / ``load_preference_dataset``),
   then the method's rows (:func:`nca_kit.experiment.method_dataset`: pruned pairs, K responses, the K ablation);
2. :func:`nca_kit.training.train` with the paper's recipe (``configs/paper_*.yaml``, Appendix C) and the scale's
   overrides (:func:`train_config`);
3. the evaluation hooks of :mod:`nca_kit.benchmarks`: MT-bench and AlpacaEval answer files for the GPT-4 judges
   (:func:`evaluate_alignment`), or lm-eval exact match on reasoning tasks for the trained and the base model
   (:func:`evaluate_reasoning`); the KL to the reference and the likelihood trends of training;
4. one record per run, ``<run_dir>/results.json`` (:func:`write_record`), which the notebooks' figures read.

``paper`` is Mistral-7B with QLoRA on the hub datasets (a GPU and network); ``small`` SmolLM2-135M-Instruct and
``tiny`` a random 2-layer Llama, both on the fixtures in ``data/`` (any CPU, offline).

What makes a run "paper scale" is two things, kept apart here. The *recipe* is ``configs/paper_*.yaml`` (Appendix C:
QLoRA NF4 with double quantisation, LoRA r 16 / alpha 16 / dropout 0.05 on every projection, gradient
checkpointing, alpha = beta = 0.01, lr 5e-6 cosine with 10 % warmup, K = 4, the cached reference, the batch reached
by gradient accumulation) and the evaluation path (answer files for the judges, lm-eval without a chat template).
The *size* is the model (Mistral-7B, 32 layers), the data (hub datasets) and the lengths (1,024 tokens, batch 32).
``paper_shape`` keeps the recipe and changes only the size (:data:`PAPER_SHAPE_REDUCED`): a Mistral-architecture
model at Mistral-7B's widths (:data:`MISTRAL_7B_SHAPE`) with 2 of its 32 layers and random weights, built once per
process in a temporary folder (:func:`paper_shape_model`) and loaded through the same QLoRA path of
:func:`nca_kit.models.load_model`, on a slice of the fixtures in ``data/``. It runs on a CPU where bitsandbytes
does 4-bit; what it cannot run is what needs the real 7B weights (meaningful answers and scores), the hub datasets
(network) and the GPT-4 judge (an API key).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from nca_kit import benchmarks
from nca_kit import eval as ev

__all__ = ["SCALES", "REPO", "MISTRAL_7B_SHAPE", "PAPER_SHAPE_MODEL", "PAPER_SHAPE_REDUCED", "paper_shape_model",
           "model_source", "reward_data", "pair_data", "train_config", "method_rows", "evaluate_alignment", "evaluate_reasoning",
           "write_record"]

REPO = Path(__file__).resolve().parents[1]

#: Mistral-7B's widths (the ``config.json`` of ``HuggingFaceH4/mistral-7b-sft-beta``, a Mistral-7B-v0.1 finetune).
#: Mistral-7B's shape (the planner's named shape, written down from its config.json): the widths of ``paper_shape``.
MISTRAL_7B_SHAPE = "mistral-7b-sft-beta"
#: The model name of the ``paper_shape`` scale, built by :func:`paper_shape_model` (not a hub id).
PAPER_SHAPE_MODEL = "mistral-7b-shape"
#: What ``paper_shape`` reduces, against the paper's size; everything else is the paper's recipe unchanged.
PAPER_SHAPE_REDUCED = {
    "layers": "2 of Mistral-7B's 32 (widths unchanged: hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 32000), "
              "random weights",
    "tokenizer": "the kit's byte-level test tokenizer (384 tokens, ChatML template) instead of Mistral's",
    "data": "the first prompts of the fixtures in data/ instead of the hub datasets",
    "lengths": "prompt 24 / sequence 48 tokens instead of 512 / 1024",
    "batch": "2 prompts per step (1 per forward x 2 accumulation steps) instead of 32; 2 optimizer steps",
    "evaluation": "2 questions per benchmark, 4 new tokens; lm-eval on the kit's local arithmetic task instead of "
                  "lm-eval's hub tasks",
}

#: scale -> what it runs on. ``overrides`` change the paper recipe (``configs/...yaml``) for the scale; ``None``
#: sources are the hub's (paper scale). Sizes at the small scales are for a CPU; paper-scale sizes are the paper's.
SCALES = {
    "paper": {
        "model": "HuggingFaceH4/mistral-7b-sft-beta",  # Sec. 5.1: Mistral-7B SFT (Zephyr-beta's SFT model)
        "reasoning_model": "openbmb/Eurus-7b-sft",  # Sec. 5.2 (configs/paper_ultrainteract_nca.yaml)
        "reward_data": ("ChenDRAG/ultrafeedback_reward", "nca_reward", "train_prefs"),  # K = 4, GPT-4 scores
        "pair_data": ("openbmb/UltraInteract_pair", "ultrainteract_pair", "train"),
        "mt_bench": "HuggingFaceH4/mt_bench_prompts", "alpaca_eval": "tatsu-lab/alpaca_eval",
        "lm_eval_tasks": [t for t in benchmarks.TABLE3_TASKS.values() if t and t != "humaneval"],
        "overrides": {},  # Appendix C as in the YAML: lr 5e-6, batch 32, 1 epoch, alpha = beta = 0.01, QLoRA
        "max_new_tokens": 1024, "n_questions": None, "eval_limit": None, "gpu": True,
    },
    "paper_shape": {  # the paper's recipe at reduced size (PAPER_SHAPE_REDUCED); a CPU with bitsandbytes 4-bit
        "model": PAPER_SHAPE_MODEL, "reasoning_model": PAPER_SHAPE_MODEL,
        "reward_data": (REPO / "data" / "ultrafeedback_raw.jsonl", "ultrafeedback", "train"),
        "pair_data": (REPO / "data" / "ultrainteract_pair.jsonl", "ultrainteract_pair", "train"),
        "mt_bench": REPO / "data" / "mt_bench_question.jsonl", "alpaca_eval": REPO / "data" / "alpaca_eval.json",
        "lm_eval_tasks": ["nca_kit_arith"],  # lm-eval's own tasks read hub datasets: the local task instead
        "overrides": {"max_prompt_length": 24, "max_length": 48, "batch_size": 2, "per_device_batch_size": 1,
                      "max_steps": 2, "save_steps": 0},  # size only: QLoRA, checkpointing, App. C stay
        "max_new_tokens": 4, "n_questions": 2, "eval_limit": 2, "gpu": False,
    },
    "small": {
        "model": "smollm2-135m-instruct", "reasoning_model": "smollm2-135m-instruct",
        "reward_data": (REPO / "data" / "ultrafeedback_raw.jsonl", "ultrafeedback", "train"),
        "pair_data": (REPO / "data" / "ultrainteract_pair.jsonl", "ultrainteract_pair", "train"),
        "mt_bench": REPO / "data" / "mt_bench_question.jsonl", "alpaca_eval": REPO / "data" / "alpaca_eval.json",
        "lm_eval_tasks": ["nca_kit_arith"],  # the kit's held-out arithmetic in GSM8K form (local)
        "overrides": {"learning_rate": 2e-4, "beta": 0.1, "batch_size": 1, "per_device_batch_size": 1,
                      "num_train_epochs": 2, "quantize_4bit": False, "gradient_checkpointing": False,
                      "max_prompt_length": 256, "max_length": 384, "save_steps": 0},
        "max_new_tokens": 64, "n_questions": None, "eval_limit": 40, "gpu": False,
    },
    "tiny": {
        "model": "tiny-llama", "reasoning_model": "tiny-llama",
        "reward_data": (REPO / "data" / "ultrafeedback_raw.jsonl", "ultrafeedback", "train"),
        "pair_data": (REPO / "data" / "ultrainteract_pair.jsonl", "ultrainteract_pair", "train"),
        "mt_bench": REPO / "data" / "mt_bench_question.jsonl", "alpaca_eval": REPO / "data" / "alpaca_eval.json",
        "lm_eval_tasks": ["nca_kit_arith"],
        "overrides": {"learning_rate": 1e-3, "beta": 0.1, "batch_size": 1, "per_device_batch_size": 1,
                      "num_train_epochs": 2, "quantize_4bit": False, "gradient_checkpointing": False,
                      "max_prompt_length": 256, "max_length": 384, "save_steps": 0},
        "max_new_tokens": 16, "n_questions": None, "eval_limit": 8, "gpu": False,
    },
}


def scale_settings(scale: str) -> dict:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return SCALES[scale]


@functools.lru_cache(maxsize=4)
def paper_shape_model(layers: int = 2) -> Path:
    """A folder holding a Mistral-architecture model at Mistral-7B's widths (:data:`MISTRAL_7B_SHAPE`) with ``layers``
    decoder layers, random weights (seed 0, stored in bfloat16: 1.4 GB at 2 layers) and the kit's test tokenizer;
    built once per process in a temporary folder (removed at exit). :func:`nca_kit.models.load_model` reads it like
    any local model folder, in NF4 with ``quantize_4bit``."""
    import atexit
    import shutil
    import tempfile

    from nca_kit.plan import model_shape, save_random_model

    folder = Path(tempfile.mkdtemp(prefix=f"nca-kit-mistral-7b-shape-{layers}l-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return save_random_model(model_shape(MISTRAL_7B_SHAPE).with_layers(layers), folder)


def model_source(scale: str, override: str = "", *, reasoning: bool = False) -> str:
    """What ``load_model`` reads for ``scale``: ``override`` (a local model folder or another hub id) when given, else
    the scale's model (``paper``: the hub id; ``paper_shape``: the folder of :func:`paper_shape_model`)."""
    name = override or scale_settings(scale)["reasoning_model" if reasoning else "model"]
    return str(paper_shape_model()) if name == PAPER_SHAPE_MODEL else str(name)


def reward_data(scale: str, override: str = "") -> tuple:
    """``(source, layout, split)`` of the scale's reward data, or of ``override`` (a local file, layout detected)."""
    return (override, "auto", "train") if override else scale_settings(scale)["reward_data"]


def pair_data(scale: str, override: str = "") -> tuple:
    """``(source, layout, split)`` of the scale's pair data, or of ``override`` (a local file, layout detected)."""
    return (override, "auto", "train") if override else scale_settings(scale)["pair_data"]


def train_config(scale: str, recipe: str, *, model: str, loss_type: str, run_dir: Path, seed: int = 0,
                 **changes):
    """The paper's recipe ``configs/<recipe>.yaml`` with the scale's overrides, this run's loss, model, seed and
    output folder, and any ``changes`` (e.g. ``alpha``, ``beta``, ``max_steps``)."""
    from nca_kit.training import TrainConfig

    overrides = {**scale_settings(scale)["overrides"], "model_name": model, "loss_type": loss_type,
                 "output_dir": str(run_dir), "seed": seed, "disable_tqdm": True, "save_total_limit": None,
                 **changes}
    return TrainConfig.from_yaml(REPO / "configs" / f"{recipe}.yaml", overrides)


def method_rows(scale: str, method: str, *, k: int = 4, seed: int = 0, limit: int | None = None, data: str = ""):
    """``(rows, loss_type)``: the scale's UltraFeedback reward data (or the file ``data``) through the kit's adapter,
    as ``method`` trains on it (:func:`nca_kit.experiment.method_dataset`); ``limit`` keeps the first prompts."""
    from nca_kit.data import load_reward_dataset
    from nca_kit.experiment import method_dataset

    source, layout, split = reward_data(scale, data)
    data = load_reward_dataset(source, layout=layout, split=split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return method_dataset(data, method, k=k, seed=seed)


def evaluate_alignment(model, tokenizer, scale: str, run_dir: Path, *, model_id: str, limit: int | None = None,
                       max_new_tokens: int | None = None, progress: bool = False) -> dict:
    """MT-bench and AlpacaEval answer files of ``model`` under ``<run_dir>/answers/`` (validated against the
    judges' schemas), and the KL estimate to the reference on the first-turn MT-bench answers.

    Returns ``{"mt_bench_file", "alpaca_eval_file", "n_mt_bench", "n_alpaca_eval", "kl"}``; the files are what
    FastChat's ``gen_judgment.py`` and ``alpaca_eval`` read (commands in :mod:`nca_kit.benchmarks`). The KL is
    ``mean [log pi(y|x) - log mu(y|x)]`` over those greedy answers (adapters off for mu): how far the policy moved
    on the evaluation prompts, the x-axis of the paper's Fig. 4 and 6.
    """
    settings = scale_settings(scale)
    tokens = max_new_tokens or settings["max_new_tokens"]
    questions = benchmarks.load_mt_bench_questions(settings["mt_bench"], limit=limit)
    rows = benchmarks.load_alpaca_eval(settings["alpaca_eval"], limit=limit)
    answers = benchmarks.mt_bench_answers(model, tokenizer, questions, model_id=model_id, max_new_tokens=tokens,
                                          progress=progress)
    mt_file = benchmarks.write_jsonl(answers, Path(run_dir) / "answers" / "model_answer" / f"{model_id}.jsonl")
    outputs = benchmarks.alpaca_eval_outputs(model, tokenizer, rows, generator=model_id, max_new_tokens=tokens,
                                             progress=progress)
    alpaca_file = Path(run_dir) / "answers" / f"alpaca_eval_{model_id}.json"
    alpaca_file.write_text(json.dumps(outputs, indent=1))
    ratios = ev.kl_to_reference(model, tokenizer, [[{"role": "user", "content": q["turns"][0]}] for q in questions],
                                [[a["choices"][0]["turns"][0]] for a in answers], progress=progress)
    kl = sum(r[0] for r in ratios) / len(ratios)
    return {"mt_bench_file": str(mt_file), "alpaca_eval_file": str(alpaca_file),
            "n_mt_bench": benchmarks.validate_answer_file(mt_file),
            "n_alpaca_eval": benchmarks.validate_answer_file(alpaca_file), "kl": kl}


def arith_task_folder(folder: Path) -> Path:
    """The local lm-eval task ``nca_kit_arith``: the held-out prompts of the kit's committed SmolLM2 arithmetic set
    in GSM8K form, under ``folder``."""
    from nca_kit.experiment import DATA_DIR, ExperimentSpec
    from nca_kit.generate import load_or_generate

    spec = ExperimentSpec()
    test = load_or_generate(spec.generation_settings(), search_dirs=(DATA_DIR,), progress=False)["test"]
    data = benchmarks.arith_as_gsm8k(test, Path(folder) / "nca_kit_arith.jsonl")
    return benchmarks.write_gsm8k_task(data, Path(folder) / "tasks", name="nca_kit_arith")


def evaluate_reasoning(model, tokenizer, scale: str, *, include_path: Path | None, limit: int | None = None,
                       base: bool = False) -> dict:
    """lm-eval scores of ``model`` (its adapters off with ``base=True``: the SFT model) on the scale's reasoning
    tasks: ``{task: {"exact_match,<filter>": value, ...}}``."""
    settings = scale_settings(scale)
    limit = limit if limit is not None else settings["eval_limit"]
    run = lambda: benchmarks.lm_eval_scores(model, settings["lm_eval_tasks"], tokenizer=tokenizer,  # noqa: E731
                                            include_path=include_path, limit=limit,
                                            apply_chat_template=not scale.startswith("paper"))
    if base:
        with model.disable_adapter():
            return run()
    return run()


def write_record(run_dir: Path, record: dict) -> dict:
    """``<run_dir>/results.json`` (machine paths made relative to the run folder)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, default=float).replace(str(run_dir.resolve()) + "/", "").replace(
        str(run_dir) + "/", "")
    (run_dir / "results.json").write_text(text)
    return json.loads(text)
