r"""Evaluation of an aligned policy on held-out verifiable prompts (:mod:`nca_kit.tasks`).

Three numbers per model, all on the same held-out prompts, and one read from training:

* **greedy accuracy** — the fraction of prompts whose greedy answer is right (the paper's Table 3 metric for
  reasoning tasks: exact match of the final answer).
* **sample reward** — the mean rubric reward (0–10, :func:`nca_kit.tasks.score`) of responses sampled at the
  data-generation temperature: the quantity the alignment objective ``pi* ∝ mu · exp(r / alpha)`` raises.
* **KL to the reference** — the Monte-Carlo estimate ``mean_{y ~ pi} [log pi(y|x) − log mu(y|x)]`` over those
  same sampled responses. The reference ``mu`` is the policy with its LoRA adapters disabled (the frozen base
  model; or an explicit ``reference_model``). Two caveats, both shared by every run so comparisons stay fair:
  the samples are drawn at temperature ``T`` (0.8), so the estimate is that of ``E_{pi_T}[log pi − log mu]``, the
  exact KL only at ``T = 1``; and each response is scored as the trainer scores it (its text re-tokenized and
  followed by the end-of-turn token), also when sampling cut it off. A KL is never negative, but this estimate
  can be: each term ``log pi − log mu`` of one sample may have either sign, and with one sample per prompt (and
  samples at ``T`` < 1) their mean can fall below 0 when the policy is close to the reference. A small negative
  value reads "indistinguishable from 0 at this sample size", not a negative divergence.
* **likelihood of the best and worst response during training** — :func:`likelihood_trends` reads
  ``logps/chosen_delta`` and ``logps/rejected_delta`` (``log pi_theta(y|x) − log mu(y|x)`` of the highest- and
  lowest-reward training response, per step) from the trainer's ``metrics.jsonl``: the paper's Fig. 5.

Everything is batched, with progress bars, and deterministic for fixed seeds. :func:`evaluate_cached` stores a
result as JSON so the unchanged base model is evaluated once per setting, not once per run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from nca_kit.cache import Cache
from nca_kit.sampling import sample_responses
from nca_kit.tasks import Problem, score

__all__ = ["EvalResult", "evaluate", "evaluate_cached", "kl_to_reference", "likelihood_trends", "problems_from"]


@dataclass
class EvalResult:
    """Held-out metrics of one model (see the module docstring); ``rows`` holds the per-prompt details."""

    greedy_accuracy: float
    greedy_reward: float
    sample_reward: float
    sample_accuracy: float
    kl: float
    n_prompts: int
    n_samples: int
    temperature: float
    rows: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """The scalar metrics only (what a results table holds)."""
        out = asdict(self)
        out.pop("rows")
        return out


def problems_from(data) -> list[Problem]:
    """Problems from a list of :class:`~nca_kit.tasks.Problem` or a dataset with ``prompt``, ``answer`` (and ``id``,
    ``kind``) columns, such as the ``test`` split of :func:`nca_kit.generate.load_or_generate`."""
    if isinstance(data, list) and all(isinstance(p, Problem) for p in data):
        return data
    rows = data.to_list() if hasattr(data, "to_list") else list(data)
    out = []
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        out.append(Problem(str(row.get("id", i)), row.get("kind", ""), question, int(row["answer"])))
    return out


@torch.no_grad()
def kl_to_reference(
    model,
    tokenizer,
    prompts: list[list[dict]],
    responses: list[list[str]],
    *,
    reference_model=None,
    batch_size: int = 8,
    max_prompt_length: int = 512,
    max_length: int = 1024,
    progress: bool = True,
) -> list[list[float]]:
    """``log pi(y|x) − log mu(y|x)`` for each response (``[len(prompts)][k]``), policy and reference in eval mode.

    ``mu`` is ``reference_model`` when given, else ``model`` with its PEFT adapters disabled. A model with neither
    is its own reference: every log-ratio is 0 and no forward pass runs. Responses are tokenized as in training
    (:func:`nca_kit.logps.tokenize_reward_dataset` with the same ``max_prompt_length`` / ``max_length``).
    """
    from datasets import Dataset
    from nca_kit.progress import progress as progress_lines

    from nca_kit.logps import (RewardCollator, has_adapters, reference_logps, sequence_logps, tokenize_reward_dataset,
                               unwrap_model)

    is_peft = has_adapters(model)
    if reference_model is None and not is_peft:
        return [[0.0] * len(r) for r in responses]
    rows = [{"prompt": p, "responses": r, "rewards": [0.0] * len(r)} for p, r in zip(prompts, responses)]
    tokenized = tokenize_reward_dataset(Dataset.from_list(rows), tokenizer, max_prompt_length=max_prompt_length,
                                        max_length=max_length)
    collator = RewardCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    device = next(unwrap_model(model).parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        batches = range(0, len(tokenized), batch_size)
        for start in progress_lines(batches, desc="kl", bar=progress, unit="batch"):
            batch = collator([tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            policy = sequence_logps(model, batch)  # (B, K)
            reference = reference_logps(model, batch, reference_model=reference_model)  # (B, K)
            ratio = (policy - reference).float().cpu()  # (B, K)
            for row, mask in zip(ratio, batch["response_mask"].cpu()):
                out.append(row[mask].tolist())
    finally:
        model.train(was_training)
    return out


def evaluate(
    model,
    tokenizer,
    problems,
    *,
    n_samples: int = 1,
    temperature: float = 0.8,
    max_new_tokens: int = 20,
    batch_size: int = 64,
    kl_batch_size: int = 8,
    seed: int = 0,
    reference_model=None,
    max_prompt_length: int = 512,
    max_length: int = 1024,
    progress: bool = True,
) -> EvalResult:
    """Greedy accuracy, sample reward and KL to the reference on held-out ``problems`` (see module docstring).

    ``problems``: a list of :class:`~nca_kit.tasks.Problem` or a dataset with ``prompt`` and ``answer``.
    ``n_samples`` responses per prompt are sampled at ``temperature`` (seeded by ``seed``) for the sample reward
    and the KL estimate; the greedy answer is one more response per prompt. ``max_prompt_length`` / ``max_length``
    truncate the KL pass as training truncated (pass the run's own lengths).
    """
    problems = problems_from(problems)
    if not problems:
        raise ValueError("no problems to evaluate")
    prompts = [p.messages for p in problems]
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    greedy, greedy_cut = sample_responses(model, tokenizer, prompts, k=1, greedy=True, desc="greedy", **common)
    samples, samples_cut = sample_responses(model, tokenizer, prompts, k=n_samples, temperature=temperature,
                                            seed=seed, desc="samples", **common)
    log_ratios = kl_to_reference(model, tokenizer, prompts, samples, reference_model=reference_model,
                                 batch_size=kl_batch_size, max_prompt_length=max_prompt_length,
                                 max_length=max_length, progress=progress)
    rows = []
    for p, g, gc, s, sc, lr in zip(problems, greedy, greedy_cut, samples, samples_cut, log_ratios):
        g_score = score(g[0], p.answer, truncated=gc[0])
        s_scores = [score(text, p.answer, truncated=cut) for text, cut in zip(s, sc)]
        rows.append({
            "id": p.id, "kind": p.kind, "answer": p.answer,
            "greedy": g[0], "greedy_correct": g_score.correct, "greedy_reward": g_score.total,
            "samples": s, "sample_rewards": [x.total for x in s_scores],
            "sample_correct": [x.correct for x in s_scores], "log_ratios": lr,
        })
    n = len(rows)
    flat_rewards = [x for r in rows for x in r["sample_rewards"]]
    flat_correct = [x for r in rows for x in r["sample_correct"]]
    flat_ratio = [x for r in rows for x in r["log_ratios"]]
    return EvalResult(
        greedy_accuracy=sum(r["greedy_correct"] for r in rows) / n,
        greedy_reward=sum(r["greedy_reward"] for r in rows) / n,
        sample_reward=sum(flat_rewards) / len(flat_rewards),
        sample_accuracy=sum(flat_correct) / len(flat_correct),
        kl=sum(flat_ratio) / len(flat_ratio),
        n_prompts=n,
        n_samples=n_samples,
        temperature=float(temperature),
        rows=rows,
    )


def evaluate_cached(cache_dir, model_fn, problems, *, tag: str, **kwargs) -> EvalResult:
    """:func:`evaluate` once per setting, then read back from the :class:`nca_kit.cache.Cache` in ``cache_dir``.

    The entry is ``eval_<tag>_<key>.json``, keyed by ``tag`` (name the model: e.g. ``"smollm2-135m-instruct-base"``),
    the problems (ids, questions and answers) and every keyword argument but ``progress``, so a changed setting never
    reads a stale result. ``model_fn()`` returns ``(model, tokenizer)`` and is called only on a miss: a cached
    base-model evaluation skips even the model load. Returns the result; ``.cache_hit`` says which way it came.
    A cached entry is verified by content (:class:`nca_kit.cache.Cache`) and must hold one row per problem asked
    for, in order; otherwise it is recomputed with a warning naming the file.
    """
    problems = problems_from(problems)
    settings = {k: v for k, v in kwargs.items() if k != "progress"}
    settings["tag"] = tag
    settings["problems"] = [[p.id, p.question, p.answer] for p in problems]

    def compute() -> dict:
        model, tokenizer = model_fn()
        return asdict(evaluate(model, tokenizer, problems, **kwargs))

    def validate(value) -> str | None:  # a cached result must be a whole evaluation of these problems
        names = {f.name for f in fields(EvalResult)}
        if not isinstance(value, dict) or set(value) != names:
            return f"it does not hold the fields of an EvalResult ({sorted(names)})"
        if value["n_prompts"] != len(problems) or len(value["rows"]) != len(problems):
            return (f"it holds {value['n_prompts']} prompts and {len(value['rows'])} rows, "
                    f"not the {len(problems)} asked for")
        if [row.get("id") for row in value["rows"]] != [p.id for p in problems]:
            return "its rows are for other problems than asked for"
        return None

    cache = Cache(cache_dir)
    result = EvalResult(**cache.json(f"eval_{tag}", settings, compute, validate=validate))
    result.cache_hit = cache.last_hit
    return result


def likelihood_trends(metrics: list[dict]) -> dict[str, list[float]]:
    """Per-step ``log pi − log mu`` of the best (``chosen``) and worst (``rejected``) training response.

    ``metrics``: the records of the trainer's ``metrics.jsonl`` (:func:`nca_kit.training.read_metrics`). Returns
    ``{"step": [...], "chosen": [...], "rejected": [...]}`` from the keys ``logps/chosen_delta`` and
    ``logps/rejected_delta``; steps without them are skipped.
    """
    steps, chosen, rejected = [], [], []
    for record in metrics:
        if "logps/chosen_delta" in record and "logps/rejected_delta" in record:
            steps.append(record.get("step", len(steps)))
            chosen.append(float(record["logps/chosen_delta"]))
            rejected.append(float(record["logps/rejected_delta"]))
    return {"step": steps, "chosen": chosen, "rejected": rejected}
