r"""One experiment layer for every run: a typed spec, the steps of a run, and the record a run leaves.

Every real run of the course is the same sequence at a different scale: load a model, build a reward dataset,
train with a loss, evaluate on held-out prompts, record the results. :class:`ExperimentSpec` states one run (and
validates every setting before anything is loaded); :class:`Experiment` executes it step by step, so a notebook can
show each step; :func:`run_experiment` runs all steps and returns the record (what ``scripts/run_grid.py`` calls).

    spec = ExperimentSpec(method="nca", k=4, steps=20)
    record = run_experiment(spec, out="runs/grid")      # writes runs/grid/tiny_runs/nca_k4_s0/results.json

The steps (each timed into ``record["seconds"]``):

1. ``load_data`` — the arithmetic reward dataset of :mod:`nca_kit.generate` (``data/`` holds the default one), its
   rewards then given by the ``reward_source`` (:data:`nca_kit.rewards.sources.REWARD_SOURCES`: the golden rubric,
   embedding reward models, follow-up likelihood, Direct, or random), and that source's agreement with the rubric
   (:func:`reward_quality`);
2. ``method_rows`` — the training rows of ``method`` (:data:`METHODS`: pairs or K scored responses);
3. ``load_model`` + ``evaluate_base`` — the policy with fresh LoRA adapters, and the base model (adapters off)
   evaluated once per setting (cached);
4. ``train`` — :func:`nca_kit.training.train` (a ``transformers.Trainer`` with the loss of ``method``);
5. ``evaluate`` + ``record`` — the trained policy on the same held-out prompts, and ``results.json``.

Record schema (``<out>/tiny_runs/<run>/results.json``, one JSON object; :func:`flat_row` makes it a CSV row)::

    run, method, loss_type, reward_source, k, alpha, beta, lr, steps, batch, seed, smoke   the run in short
    spec            every field of the ExperimentSpec
    data            {"file", "train_prompts", "usable_rows"}: dataset file, prompts read, rows the method can use
    reward_quality  the reward source against the rubric on the policy prompts (:func:`reward_quality`)
    train_rows      prompts trained on (steps x batch, each seen once)
    base, trained   EvalResult.summary() of the base model and of the trained policy (nca_kit.eval)
    trend           {"step", "chosen", "rejected"}: log pi - log mu of the best / worst training answer per step
    losses          the loss of every step; final_loss the last one
    seconds         wall time per step: data, model, base_eval, train, eval, total; train_seconds = seconds.train
    paths           run_dir, results, metrics (metrics.jsonl), config (config.yaml), adapter

Adding a reward source: one function ``(dataset, settings) -> dataset with new rewards`` and one line in
:data:`nca_kit.rewards.sources.REWARD_SOURCES`. Adding a method: one line in :data:`METHODS` (a loss of
:mod:`nca_kit.losses`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from nca_kit import data as kit_data
from nca_kit import eval as ev
from nca_kit.cache import default_cache_dir
from nca_kit.generate import GenerationSettings, load_or_generate
from nca_kit.losses import loss_spec
from nca_kit.rewards.sources import REWARD_SOURCES, SourceSettings, rubric_rewards

__all__ = [
    "METHODS",
    "PAIR_METHODS",
    "REWARD_SOURCES",
    "DATA_SOURCES",
    "SMOKE_SIZES",
    "ExperimentSpec",
    "Experiment",
    "run_experiment",
    "method_dataset",
    "flat_row",
    "load_records",
    "EVAL_METRICS",
    "check_scored",
    "reward_quality",
]

_REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = _REPO_ROOT / "data"  # committed datasets, searched before the cache

#: method -> its loss (:data:`nca_kit.losses.LOSSES`: ``loss_type``, data kind, whether it reads alpha). Pairwise
#: losses train on one Zephyr-style pair per prompt (the best response against one drawn among the strictly worse
#: ones); reward losses on the K scored responses of each prompt.
METHODS = {
    "dpo": loss_spec("dpo", "pairwise"),  # DPO on pruned pairs (Table 2's "DPO" row, UltraFeedback-binarized style)
    "pair_nca": loss_spec("nca", "pairwise"),  # pairwise NCA (Eq. 12) on the same pairs
    "dpo_x3": loss_spec("dpo_best_vs_rest", "reward"),  # DPO x (K-1): the best against each other response
    "dpo_all_pairs": loss_spec("dpo_all_pairs", "reward"),  # DPO x C(K,2): every pair ordered by reward
    "infonca": loss_spec("infonca", "reward"),  # InfoNCA (Eq. 6) on the K rewards
    "nca": loss_spec("nca", "reward"),  # NCA (Eq. 11) on the K rewards
}
PAIR_METHODS = tuple(m for m, loss in METHODS.items() if loss.data == "pairwise")

#: Data sources a spec can name: "arith" is the kit's verifiable arithmetic set sampled from the spec's model.
DATA_SOURCES = ("arith",)

#: Sizes a smoke run uses instead of the spec's. Three steps, because warmup gives step 1 a learning rate of 0 and a
#: step logs before its own update: step 2 is the first real update, step 3 the first log that shows it.
SMOKE_SIZES = {"steps": 3, "batch": 2, "n_eval": 4}

#: The held-out metrics of a record's ``base`` / ``trained`` that a results table compares.
EVAL_METRICS = ("greedy_accuracy", "sample_reward", "sample_accuracy", "kl")


# --------------------------------------------------------------------------------------------------------------------
# Reward sources (nca_kit.rewards.sources): who scores the K responses of the training set, and how well
# --------------------------------------------------------------------------------------------------------------------


def check_scored(train, what: str = "dataset") -> None:
    """A one-line ``ValueError`` unless every row has one finite reward per response."""
    if "rewards" not in train.column_names:
        raise ValueError(f"{what}: no 'rewards' column; score the responses with a reward source first")
    for i, (ys, rs) in enumerate(zip(train["responses"], train["rewards"])):
        if rs is None or len(rs) != len(ys) or not all(r is not None and math.isfinite(r) for r in rs):
            raise ValueError(f"{what}: row {i} has {len(ys)} responses but rewards {rs!r}; score the responses "
                             "with a reward source first")


def reward_quality(scored, golden, alpha: float | None = None) -> dict:
    """How well a source's rewards (``scored``, B rows of K) order the answers like the rubric (``golden``, the same
    B rows): within-prompt pairwise accuracy over pairs with different rubric rewards, Spearman's rho over all
    answers and its mean per prompt, order consistency over all pairs, and Best-of-K (the rubric reward of the
    answer the source ranks first; :func:`nca_kit.rewards.metrics.evaluate`). With ``alpha``: ``top_label``, the
    mean largest soft label ``max_i softmax(r / alpha)_i`` that InfoNCA / NCA train on (1.0: one-hot on the
    source's best answer, so only the source's order matters)."""
    import numpy as np

    from nca_kit.rewards.metrics import evaluate

    check_scored(scored, "scored")
    check_scored(golden, "golden")
    if list(scored["responses"]) != list(golden["responses"]):
        raise ValueError("golden: the rows must be the scored rows with rubric rewards (same prompts, same answers)")
    s = np.array([r for rs in scored["rewards"] for r in rs], dtype=np.float64)  # (B*K,)
    g = np.array([r for rs in golden["rewards"] for r in rs], dtype=np.float64)  # (B*K,)
    groups = np.repeat(np.arange(len(scored)), [len(rs) for rs in scored["rewards"]])  # (B*K,)
    out = {**evaluate(s, g, groups), "n_prompts": len(scored)}
    if alpha is not None and alpha > 0:
        top = [np.exp((np.array(rs) - max(rs)) / alpha) for rs in scored["rewards"]]
        out["top_label"] = float(np.mean([t.max() / t.sum() for t in top]))
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentSpec:
    """Every setting of one run; construction validates them all (a bad value is a one-line ``ValueError``)."""

    # --- model and data
    model: str = "smollm2-135m-instruct"  # nca_kit.models.load_model name; it also samples the dataset
    data_model: str = ""  # the model whose samples form the dataset, if not `model` (a tiny test model on SmolLM2's)
    data: str = "arith"  # a DATA_SOURCES name
    reward_source: str = "rubric"  # a REWARD_SOURCES name: who scores the K responses
    reward_prompts: int = 100  # the first training prompts: all the policy may train on when the source is not rubric
    reward_fit_prompts: int = 150  # the last training prompts: what the embedding heads are fitted on
    n_train: int = 300  # training prompts of the dataset
    n_test: int = 100  # held-out prompts (disjoint question texts)
    data_k: int = 4  # responses sampled per prompt when the dataset is made (the paper's K = 4)
    gen_seed: int = 0  # prompt and sampling seed of the dataset; also the evaluation's sampling seed
    temperature: float = 0.8  # sampling temperature of the dataset and of the evaluation samples
    max_new_tokens: int = 20  # answers are one short line
    train_prefix_only: bool = False  # read only the train rows this run needs (a dataset still being generated)
    # --- method and loss
    method: str = "nca"  # a METHODS name
    k: int = 4  # responses per prompt for the reward methods (the K ablation keeps the best + K-1 others)
    alpha: float = 0.01  # reward temperature (Appendix C)
    beta: float = 0.1  # implicit-reward scale; the paper's 0.01 is for answers 10x longer than ours
    # --- optimisation
    lr: float = 2e-4  # LoRA learning rate (AdamW, cosine schedule)
    warmup_ratio: float = 0.1  # warmup over the first 10% of steps (Appendix C)
    steps: int = 20  # optimizer steps; each prompt is seen once (steps x batch training prompts)
    batch: int = 4  # prompts per optimizer step
    seed: int = 0  # LoRA init, data order, subsampling of responses and pairs
    max_prompt_length: int = 128  # tokens; the arithmetic prompts are ~60
    max_length: int = 160  # prompt + response tokens, in training and in the evaluation's KL pass
    # --- evaluation and hardware
    n_eval: int = 100  # held-out prompts evaluated
    eval_samples: int = 1  # sampled answers per held-out prompt (sample reward and KL estimate)
    device: str = "cpu"  # "cuda" on a GPU machine
    smoke: bool = False  # smoke sizes (SMOKE_SIZES); set by smoke_sized()

    def __post_init__(self):
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _require("model", bool(self.model.strip()), "a model name or path", self.model)
        _require_in("data", self.data, DATA_SOURCES)
        _require_in("reward_source", self.reward_source, REWARD_SOURCES)
        if self.reward_source != "rubric":
            _require("reward_prompts", 1 <= self.reward_prompts < self.n_train,
                     f"an integer from 1 to n_train - 1 = {self.n_train - 1}", self.reward_prompts)
            _require("reward_fit_prompts", 1 <= self.reward_fit_prompts <= self.n_train - self.reward_prompts,
                     f"an integer from 1 to n_train - reward_prompts = {self.n_train - self.reward_prompts} (the "
                     "prompts a reward model is fitted on are never trained on)", self.reward_fit_prompts)
        _require_in("method", self.method, METHODS)
        for name in ("n_train", "n_test", "steps", "batch", "n_eval", "eval_samples", "max_new_tokens",
                     "max_prompt_length"):
            _require(name, getattr(self, name) >= 1, "an integer >= 1", getattr(self, name))
        _require("data_k", self.data_k >= 2, "an integer >= 2", self.data_k)
        _require("k", 2 <= self.k <= self.data_k,
                 f"an integer from 2 to {self.data_k} (the dataset has data_k = {self.data_k} responses per prompt)",
                 self.k)
        _require("alpha", math.isfinite(self.alpha) and self.alpha >= 0, "a finite number >= 0", self.alpha)
        for name in ("beta", "lr", "temperature"):
            value = getattr(self, name)
            _require(name, math.isfinite(value) and value > 0, "a finite number > 0", value)
        _require("warmup_ratio", 0 <= self.warmup_ratio < 1, "a number in [0, 1)", self.warmup_ratio)
        _require("max_length", self.max_length > self.max_prompt_length,
                 f"larger than max_prompt_length = {self.max_prompt_length}", self.max_length)
        _require("steps", self.steps * self.batch <= self.n_train,
                 f"at most n_train / batch = {self.n_train // self.batch} (each of the n_train = {self.n_train} "
                 f"prompts is seen once, batch = {self.batch} per step)", self.steps)
        if self.reward_source != "rubric":
            _require("steps", self.steps * self.batch <= self.reward_prompts,
                     f"at most {self.reward_prompts // self.batch} for reward_source {self.reward_source} (it scores "
                     f"only the reward_prompts = {self.reward_prompts} policy prompts, batch = {self.batch} per step)",
                     self.steps)
        _require("n_eval", self.n_eval <= self.n_test, f"at most n_test = {self.n_test}", self.n_eval)
        _require("seed", self.seed >= 0, "an integer >= 0", self.seed)
        _require("gen_seed", self.gen_seed >= 0, "an integer >= 0", self.gen_seed)
        _require("device", re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device) is not None, "cpu, cuda, cuda:N or mps",
                 self.device)
        if self.device.startswith("cuda"):
            import torch

            _require("device", torch.cuda.is_available(), "cpu on this machine (CUDA is not available)", self.device)

    # -- derived values -----------------------------------------------------------------------------------------

    @property
    def run_name(self) -> str:
        """``<method>_k<K>_s<seed>``, with ``_<reward_source>`` unless it is the rubric."""
        name = f"{self.method}_k{self.k}_s{self.seed}"
        return name if self.reward_source == "rubric" else f"{name}_{self.reward_source}"

    @property
    def loss_type(self) -> str:
        return METHODS[self.method].name

    @property
    def k_trained(self) -> int:
        """Responses per training row: 2 for the pair methods, else ``k``."""
        return 2 if self.method in PAIR_METHODS else self.k

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(model_id=self.data_model or self.model, n_train=self.n_train, n_test=self.n_test,
                                  prompt_seed=self.gen_seed, sample_seed=self.gen_seed, k=self.data_k,
                                  temperature=self.temperature, max_new_tokens=self.max_new_tokens)

    def train_config(self, output_dir: Path, dataset: str | None = None):
        """The :class:`nca_kit.training.TrainConfig` of this run. ``dataset``: the file the run's training rows were
        written to (:meth:`Experiment.train` writes ``train_data.jsonl`` into the run folder, so that
        ``python -m nca_kit.train --config <run>/config.yaml --output_dir <new>`` reruns the training)."""
        from nca_kit.training import TrainConfig

        return TrainConfig(
            model_name=self.model,
            dataset=dataset or f"nca_kit.generate:{self.generation_settings().file_name()}",
            dataset_layout=None, loss_type=self.loss_type, alpha=self.alpha, beta=self.beta, learning_rate=self.lr,
            max_steps=self.steps, batch_size=self.batch, per_device_batch_size=self.batch,
            lr_scheduler_type="cosine", warmup_ratio=self.warmup_ratio, max_prompt_length=self.max_prompt_length,
            max_length=self.max_length, output_dir=str(output_dir), seed=self.seed, disable_tqdm=True,
            save_total_limit=None,
        )

    def source_settings(self, cache_dir=None) -> SourceSettings:
        """What the reward source reads (:class:`nca_kit.rewards.sources.SourceSettings`) from this spec."""
        return SourceSettings(reward_prompts=self.reward_prompts, reward_fit_prompts=self.reward_fit_prompts,
                              seed=self.seed, model=self.model, device=self.device, cache_dir=cache_dir)

    def smoke_sized(self) -> tuple[ExperimentSpec, str]:
        """This spec at :data:`SMOKE_SIZES`, and one line saying which settings that changed."""
        smoke = replace(self, smoke=True, **{k: min(v, getattr(self, k)) if k == "n_eval" else v
                                             for k, v in SMOKE_SIZES.items()})
        changes = [f"{k} {getattr(self, k)} -> {getattr(smoke, k)}" for k in SMOKE_SIZES
                   if getattr(self, k) != getattr(smoke, k)]
        return smoke, "smoke sizes: " + (", ".join(changes) if changes else "unchanged")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_type(name: str, value, hint) -> None:
    hint = str(hint)
    if hint == "bool":
        ok, what = isinstance(value, bool), "True or False"
    elif hint == "int":
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint == "float":
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, what = isinstance(value, str), "a string"
    _require(name, ok, what, value)


def _require(name: str, ok: bool, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _require_in(name: str, value, known) -> None:
    _require(name, value in known, "one of " + ", ".join(known), value)


# --------------------------------------------------------------------------------------------------------------------
# Training rows of a method
# --------------------------------------------------------------------------------------------------------------------


def method_dataset(train, method: str, *, k: int = 4, seed: int = 0):
    """``(dataset, loss_type)``: the training rows and loss of ``method`` (a key of :data:`METHODS`).

    ``train``: a reward split (prompt, responses, rewards). Reward methods keep ``k`` responses per prompt, the best
    always among them and ``k - 1`` others drawn with ``seed`` (:func:`nca_kit.data.subsample_responses`; the K
    ablation of Fig. 4). Pair methods get one pair per prompt from :func:`nca_kit.data.rewards_to_pairs` with the
    Zephyr strategy; prompts whose K rewards all tie have no pair and drop out (the reward losses keep them, where
    they carry no preference for InfoNCA and a pull towards ``r_theta = 0`` for NCA).
    """
    _require_in("method", method, METHODS)
    check_scored(train, "train")
    loss = METHODS[method]
    columns = [c for c in ("prompt", "responses", "rewards", "id", "source") if c in train.column_names]
    rewards_only = train.select_columns(columns)
    if loss.data == "pairwise":
        return kit_data.rewards_to_pairs(rewards_only, "zephyr", seed=seed), loss.name
    if k < max(len(r) for r in rewards_only["rewards"]):
        rewards_only = kit_data.subsample_responses(rewards_only, k, seed=seed)
    return rewards_only, loss.name


# --------------------------------------------------------------------------------------------------------------------
# The steps of a run
# --------------------------------------------------------------------------------------------------------------------


_BASE_MODELS: dict = {}  # (model, device) -> (model, tokenizer) kept by Experiment(reuse_model=True)


class Experiment:
    """One run of ``spec``, step by step; each step keeps its result on the object (see the module docstring).

    ``out``: the run folder is ``<out>/tiny_runs/<spec.run_name>``. ``data_dir``: committed datasets, searched first;
    ``cache_dir``: where generated datasets and base-model evaluations are cached. ``reuse_model``: keep the loaded
    base model in memory for the next run of this process (a grid), and give each run a copy with fresh adapters
    (seeded by ``spec.seed`` right before they are made) instead of loading the weights again.
    """

    def __init__(self, spec: ExperimentSpec, *, out: str | Path = "runs", data_dir: str | Path = DATA_DIR,
                 cache_dir: str | Path | None = None, progress: bool = False, reuse_model: bool = False):
        self.spec, self.progress, self.reuse_model = spec, progress, reuse_model
        self.out, self.data_dir = Path(out), Path(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.run_dir = self.out / "tiny_runs" / spec.run_name
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def _timed(self, step: str):
        started = time.time()
        yield
        self.seconds[step] = round(time.time() - started, 1)

    def _needs(self, *names: str) -> None:
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            raise RuntimeError(f"run the steps in order: {', '.join(missing)} not computed yet")

    def load_data(self):
        """The dataset (``.dataset``), its train split re-scored by the reward source (``.train_split``; every source
        but the rubric keeps only the policy prompts), the held-out split (``.test_split``), and
        ``.reward_quality``: the source against the rubric on the policy prompts (:func:`reward_quality`)."""
        spec = self.spec
        prefix = min(spec.n_train, spec.steps * spec.batch + 32) if spec.train_prefix_only else None  # + tied rows
        with self._timed("data"):
            self.dataset = load_or_generate(spec.generation_settings(), cache_dir=self.cache_dir,
                                            search_dirs=(self.data_dir,), progress=self.progress,
                                            train_prefix=prefix)
            train = self.dataset["train"]
            self.train_split = REWARD_SOURCES[spec.reward_source](train, spec.source_settings(self.cache_dir))
            check_scored(self.train_split, f"reward_source {spec.reward_source}")
            self.test_split = self.dataset["test"]
            policy = min(spec.reward_prompts, len(self.train_split))
            self.reward_quality = reward_quality(self.train_split.select(range(policy)),
                                                 rubric_rewards(train.select(range(policy))), spec.alpha)
        return self.dataset

    def method_rows(self):
        """``.train_rows``: the first ``steps x batch`` rows of the method's data (``.usable_rows`` of them exist)."""
        self._needs("train_split")
        spec = self.spec
        rows, _ = method_dataset(self.train_split, spec.method, k=spec.k, seed=spec.seed)
        self.usable_rows = len(rows)
        need = spec.steps * spec.batch
        if len(rows) < need:
            raise ValueError(f"steps x batch = {need} training prompts, but method {spec.method} has only "
                             f"{len(rows)} usable rows; lower steps or batch")
        self.train_rows = rows.select(range(need))  # each prompt seen once
        return self.train_rows

    def load_model(self):
        """``.model`` (fresh LoRA adapters, Appendix C settings, seeded by ``spec.seed``), ``.tokenizer``, and the
        held-out ``.problems``."""
        from transformers import set_seed

        from nca_kit.models import LoraSettings, load_model

        self._needs("test_split")
        with self._timed("model"):
            if self.reuse_model:
                import copy

                from peft import get_peft_model

                key = (self.spec.model, self.spec.device)
                if key not in _BASE_MODELS:
                    _BASE_MODELS.clear()  # one base model at a time
                    _BASE_MODELS[key] = load_model(self.spec.model, device=self.spec.device)
                base, tokenizer = _BASE_MODELS[key]
                self.tokenizer = copy.deepcopy(tokenizer)
                set_seed(self.spec.seed)
                self.model = get_peft_model(copy.deepcopy(base), LoraSettings().to_peft())
            else:
                set_seed(self.spec.seed)
                self.model, self.tokenizer = load_model(self.spec.model, device=self.spec.device, lora=LoraSettings())
        self.problems = ev.problems_from(self.test_split.select(range(self.spec.n_eval)))
        return self.model, self.tokenizer

    def _eval_kwargs(self) -> dict:
        spec = self.spec
        return dict(n_samples=spec.eval_samples, temperature=spec.temperature, max_new_tokens=spec.max_new_tokens,
                    seed=spec.gen_seed, max_prompt_length=spec.max_prompt_length, max_length=spec.max_length,
                    progress=self.progress)

    def evaluate_base(self) -> ev.EvalResult:
        """``.base``: the base model (adapters off: the reference itself, KL 0), cached per setting."""
        self._needs("model", "problems")
        tag = re.sub(r"[^A-Za-z0-9_.-]", "-", self.spec.model.strip("/")) + "-base"
        with self._timed("base_eval"), self.model.disable_adapter():
            self.base = ev.evaluate_cached(self.cache_dir, lambda: (self.model.get_base_model(), self.tokenizer),
                                           self.problems, tag=tag, **self._eval_kwargs())
        return self.base

    def train(self):
        """``.result`` (:class:`nca_kit.training.TrainResult`) and ``.trend`` (:func:`nca_kit.eval.likelihood_trends`).
        The Trainer's printed log lines are kept out of the output; they are all in ``metrics.jsonl``."""
        from nca_kit.training import train

        self._needs("model", "train_rows")
        data_file = self.run_dir / "train_data.jsonl"  # the exact rows trained on: config.yaml names this file
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_rows.to_json(str(data_file), lines=True)
        config = self.spec.train_config(self.run_dir, dataset=str(data_file))
        with self._timed("train"), contextlib.redirect_stdout(io.StringIO()):
            self.result = train(config, model=self.model, tokenizer=self.tokenizer, dataset=self.train_rows)
        self.trend = ev.likelihood_trends(self.result.metrics)
        return self.result

    def evaluate(self) -> ev.EvalResult:
        """``.trained``: the trained policy on the held-out prompts the base model saw."""
        self._needs("result", "problems")
        with self._timed("eval"):
            self.trained = ev.evaluate(self.model, self.tokenizer, self.problems, **self._eval_kwargs())
        return self.trained

    def record(self) -> dict:
        """The run's record (schema in the module docstring), written to ``<run_dir>/results.json``."""
        self._needs("base", "trained", "result")
        spec, losses = self.spec, self.result.losses
        seconds = {**self.seconds, "total": round(sum(self.seconds.values()), 1)}
        record = {
            "run": spec.run_name, "method": spec.method, "loss_type": spec.loss_type,
            "reward_source": spec.reward_source, "k": spec.k_trained, "alpha": spec.alpha, "beta": spec.beta,
            "lr": spec.lr, "steps": spec.steps, "batch": spec.batch, "seed": spec.seed, "smoke": spec.smoke,
            "spec": spec.to_dict(),
            "data": {"file": Path(self.dataset.path).name, "train_prompts": len(self.train_split),
                     "usable_rows": self.usable_rows},
            "train_rows": len(self.train_rows),
            "reward_quality": self.reward_quality,
            "base": self.base.summary(), "trained": self.trained.summary(), "trend": self.trend,
            "losses": losses, "final_loss": losses[-1] if losses else None,
            "seconds": seconds, "train_seconds": seconds.get("train"),
            "paths": {"run_dir": str(self.run_dir), "results": str(self.run_dir / "results.json"),
                      "metrics": str(self.run_dir / "metrics.jsonl"), "config": str(self.run_dir / "config.yaml"),
                      "adapter": str(self.result.adapter_dir) if self.result.adapter_dir else None},
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "results.json").write_text(json.dumps(record, indent=1))
        return record

    def run(self) -> dict:
        """Every step in order; returns the record."""
        self.load_data()
        self.method_rows()
        self.load_model()
        self.evaluate_base()
        self.train()
        self.evaluate()
        return self.record()


def run_experiment(spec: ExperimentSpec, *, out: str | Path = "runs", **kwargs) -> dict:
    """Execute ``spec`` (:meth:`Experiment.run`) and return its record; ``kwargs`` go to :class:`Experiment`."""
    return Experiment(spec, out=out, **kwargs).run()


# --------------------------------------------------------------------------------------------------------------------
# Records as table rows
# --------------------------------------------------------------------------------------------------------------------


def load_records(out: str | Path) -> list[dict]:
    """The records of every finished run under ``<out>/tiny_runs/``, sorted by run folder."""
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "tiny_runs").glob("*/results.json"))]


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def flat_row(record: dict) -> dict:
    """One CSV row of a record: the run in short, the held-out metrics (``base_*`` for the base model), and the
    likelihood trend summarised: final, minimum, and the mean over the second half of training (one step's value
    is noisy: each step sees fresh prompts)."""
    trend = record["trend"]
    row = {key: record[key] for key in ("run", "method", "loss_type", "k", "seed", "steps", "batch", "alpha", "beta",
                                        "lr", "smoke", "train_rows", "train_seconds", "final_loss")}
    row["reward_source"] = record.get("reward_source", "rubric")
    quality = record.get("reward_quality", {})
    for m in ("accuracy", "spearman", "top_label"):
        row[f"reward_{m}"] = quality.get(m, float("nan"))
    for m in EVAL_METRICS:
        row[m] = record["trained"][m]
        row[f"base_{m}"] = record["base"][m]
    row["n_eval"] = record["trained"]["n_prompts"]
    row["chosen_delta_final"] = trend["chosen"][-1] if trend["chosen"] else float("nan")
    row["rejected_delta_final"] = trend["rejected"][-1] if trend["rejected"] else float("nan")
    row["chosen_delta_min"] = min(trend["chosen"]) if trend["chosen"] else float("nan")
    half = len(trend["chosen"]) // 2
    row["chosen_delta_late"] = _mean(trend["chosen"][half:])
    row["rejected_delta_late"] = _mean(trend["rejected"][half:])
    return row
