r"""The paper's benchmarks, through the ecosystem's own tools and file formats.

Two kinds of evaluation, as in the paper:

* **GPT-4-judged instruction following** (Table 2, Fig. 4/6/8): MT-bench (FastChat's ``llm_judge``) and AlpacaEval.
  The kit writes the *answer files* those tools read — batched generation with a progress bar — and the judge step
  runs with their own commands (it needs an OpenAI key; nothing here calls an API):

  * MT-bench: FastChat's ``question.jsonl`` in (``{"question_id", "category", "turns": [q1, q2]}``, optionally
    ``"reference"``), ``model_answer/<model_id>.jsonl`` out, one line per question:
    ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}``. The
    second turn is answered with the first question and the model's own first answer in the conversation. Then::

        cp <out>/model_answer/<model_id>.jsonl FastChat/fastchat/llm_judge/data/mt_bench/model_answer/
        cd FastChat/fastchat/llm_judge
        OPENAI_API_KEY=... python gen_judgment.py --model-list <model_id> --parallel 2   # GPT-4 single-answer grading
        python show_result.py --model-list <model_id>                                      # the MT-bench score (1-10)

  * AlpacaEval: a JSON list of ``{"instruction", "output", "generator", "dataset"}`` in (the evaluation set;
    ``output`` is the reference model's) and out (``output`` is this model's, ``generator`` its name). Then::

        OPENAI_API_KEY=... alpaca_eval --model_outputs <out>/alpaca_eval_<model_id>.json \
            --annotators_config alpaca_eval_gpt4     # win rate against the reference outputs (the paper's AlpacaEval)

  :func:`load_mt_bench_questions` / :func:`load_alpaca_eval` read a local file of the official schema or, online,
  the hub copies (``HuggingFaceH4/mt_bench_prompts``, ``tatsu-lab/alpaca_eval``); ``data/`` holds small fixtures of
  both schemas. :data:`MT_BENCH_ANSWER_SCHEMA` / :data:`ALPACA_EVAL_SCHEMA` are JSON Schemas of what FastChat and
  alpaca_eval read, and :func:`validate_answer_file` checks a file against them.

* **Reasoning accuracy** (Table 3: GSM8K-style math, MATH, BBH): ``lm-eval`` (lm-evaluation-harness) is the engine —
  its tasks, answer-extraction filters and exact-match metric — run on the in-memory policy with its PEFT adapter
  (:func:`lm_eval_scores`). Offline, :func:`write_gsm8k_task` turns a local JSONL in GSM8K form (``question``,
  ``answer`` ending in ``#### <number>``) into a custom ``lm-eval`` task; the kit's held-out arithmetic set is one
  (:func:`arith_as_gsm8k`). Online, pass lm-eval's own task names (:data:`TABLE3_TASKS`).

``lm-eval`` is an optional dependency (``pip install 'nca-kit[eval]'``), imported only inside the functions that use it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

__all__ = [
    "TABLE3_TASKS",
    "MT_BENCH_ANSWER_SCHEMA",
    "ALPACA_EVAL_SCHEMA",
    "load_mt_bench_questions",
    "load_alpaca_eval",
    "mt_bench_answers",
    "alpaca_eval_outputs",
    "write_jsonl",
    "validate_answer_file",
    "mt_bench_scores",
    "arith_as_gsm8k",
    "write_gsm8k_task",
    "lm_eval_scores",
]

#: Table 3's benchmarks and the lm-eval task that measures each (None: not in lm-eval; the paper's own scripts).
TABLE3_TASKS = {
    "BBH (CoT)": "bbh_cot_fewshot",
    "LeetCode": None,
    "HumanEval": "humaneval",  # runs model-written code: lm-eval asks for HF_ALLOW_CODE_EVAL=1 and --confirm_run_unsafe_code
    "GSM-Plus": "gsm_plus",
    "MATH": "minerva_math500",
    "TheoremQA": None,
    "SVAMP": None,
    "ASDiv": "asdiv_cot_llama",
}

MT_BENCH_ANSWER_SCHEMA = {  # one line of FastChat's model_answer/<model_id>.jsonl (gen_model_answer.py)
    "type": "object",
    "required": ["question_id", "answer_id", "model_id", "choices", "tstamp"],
    "properties": {
        "question_id": {"type": "integer"},
        "answer_id": {"type": "string", "minLength": 1},
        "model_id": {"type": "string", "minLength": 1},
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["index", "turns"],
            "properties": {"index": {"type": "integer"},
                           "turns": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}},
        "tstamp": {"type": "number"},
    },
}

ALPACA_EVAL_SCHEMA = {  # the model_outputs file of alpaca_eval (a JSON list)
    "type": "array",
    "minItems": 1,
    "items": {"type": "object", "required": ["instruction", "output", "generator"],
              "properties": {"instruction": {"type": "string"}, "output": {"type": "string"},
                             "generator": {"type": "string", "minLength": 1}, "dataset": {"type": "string"}}},
}

_MT_BENCH_QUESTION_SCHEMA = {  # one line of FastChat's data/mt_bench/question.jsonl
    "type": "object",
    "required": ["question_id", "category", "turns"],
    "properties": {"question_id": {"type": "integer"}, "category": {"type": "string"},
                   "turns": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                   "reference": {"type": "array", "items": {"type": "string"}}},
}


# --------------------------------------------------------------------------------------------------------------------
# Reading the question sets
# --------------------------------------------------------------------------------------------------------------------


def _validate(value, schema: dict, what: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise ValueError(f"{what}: {err.message} (at {where})") from None


def load_mt_bench_questions(source: str | Path, *, limit: int | None = None) -> list[dict]:
    """MT-bench questions in FastChat's schema (``question_id``, ``category``, ``turns``, optional ``reference``).

    ``source``: a local ``question.jsonl`` (each line validated), or the hub id ``HuggingFaceH4/mt_bench_prompts``
    (online; its ``prompt_id``, ``category``, ``prompt``, ``reference`` columns are mapped to FastChat's names).
    """
    path = Path(source)
    if path.exists():
        questions = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                question = json.loads(line)
                _validate(question, _MT_BENCH_QUESTION_SCHEMA, f"{path.name} line {i}")
                questions.append(question)
    else:
        import datasets

        rows = datasets.load_dataset(str(source), split="train")
        questions = [{"question_id": int(r["prompt_id"]), "category": r["category"], "turns": list(r["prompt"]),
                      **({"reference": list(r["reference"])} if r.get("reference") else {})} for r in rows]
    if not questions:
        raise ValueError(f"source {str(source)!r} holds no MT-bench questions")
    return questions[:limit]


def load_alpaca_eval(source: str | Path, *, limit: int | None = None) -> list[dict]:
    """AlpacaEval instructions: a local JSON list of ``{instruction, output, generator, dataset}`` (validated), or
    the hub id ``tatsu-lab/alpaca_eval`` (online; its ``alpaca_eval`` configuration, ``eval`` split)."""
    path = Path(source)
    if path.exists():
        rows = json.loads(path.read_text())
        _validate(rows, ALPACA_EVAL_SCHEMA, path.name)
    else:
        import datasets

        rows = datasets.load_dataset(str(source), "alpaca_eval", split="eval").to_list()
    return rows[:limit]


# --------------------------------------------------------------------------------------------------------------------
# Writing the answer files
# --------------------------------------------------------------------------------------------------------------------


def _generate(model, tokenizer, conversations, *, max_new_tokens: int, batch_size: int, progress: bool, desc: str):
    from nca_kit.sampling import sample_responses

    texts, _ = sample_responses(model, tokenizer, conversations, k=1, greedy=True, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=progress, desc=desc)
    return [t[0] for t in texts]


def mt_bench_answers(model, tokenizer, questions: list[dict], *, model_id: str, max_new_tokens: int = 1024,
                     batch_size: int = 8, progress: bool = True) -> list[dict]:
    """FastChat ``model_answer`` records for ``questions``: greedy answers (FastChat's default temperature is 0 for
    most categories; greedy for all keeps runs comparable), turn by turn and batched over questions. Turn ``t`` sees
    the conversation so far: every earlier question with the model's own answer to it."""
    if not model_id.strip():
        raise ValueError(f"model_id must be a non-empty name, got {model_id!r}")
    conversations = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        todo = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        for i in todo:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        texts = _generate(model, tokenizer, [conversations[i] for i in todo], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=progress, desc=f"MT-bench turn {turn + 1}")
        for i, text in zip(todo, texts):
            conversations[i].append({"role": "assistant", "content": text})
            answers[i].append(text)
    now = time.time()
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": now} for q, a in zip(questions, answers)]


def alpaca_eval_outputs(model, tokenizer, rows: list[dict], *, generator: str, max_new_tokens: int = 1024,
                        batch_size: int = 8, progress: bool = True) -> list[dict]:
    """alpaca_eval ``model_outputs`` for ``rows`` (the evaluation set): the same instructions, this model's greedy
    ``output``, ``generator`` set to its name, ``dataset`` kept."""
    if not generator.strip():
        raise ValueError(f"generator must be a non-empty name, got {generator!r}")
    texts = _generate(model, tokenizer, [[{"role": "user", "content": r["instruction"]}] for r in rows],
                      max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc="AlpacaEval")
    return [{"instruction": r["instruction"], "output": t, "generator": generator, "dataset": r.get("dataset", "")}
            for r, t in zip(rows, texts)]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """One JSON object per line (FastChat's answer files); parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def validate_answer_file(path: str | Path) -> int:
    """Check an answer file against the schema its judge reads: ``*.jsonl`` as FastChat MT-bench answers (one
    record per line), ``*.json`` as alpaca_eval model outputs. Returns the number of answers; a ``ValueError``
    names the file, the line and the field otherwise."""
    path = Path(path)
    if path.suffix == ".jsonl":
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines, start=1):
            _validate(json.loads(line), MT_BENCH_ANSWER_SCHEMA, f"{path.name} line {i}")
        ids = [json.loads(line)["question_id"] for line in lines]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path.name}: a question_id appears twice (FastChat keeps only the last)")
        return len(lines)
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        _validate(rows, ALPACA_EVAL_SCHEMA, path.name)
        return len(rows)
    raise ValueError(f"path must end in .jsonl (MT-bench answers) or .json (AlpacaEval outputs), got {path.name!r}")


def mt_bench_scores(judgment_file: str | Path) -> dict[str, float]:
    """The MT-bench score of each model in FastChat's single-answer judgment file
    (``model_judgment/gpt-4_single.jsonl``: one line per question and turn with ``model`` and the judge's ``score``
    1-10): the mean over questions and turns, skipping the judge's failures (``score`` -1), as ``show_result.py``."""
    scores: dict[str, list[float]] = {}
    for line in Path(judgment_file).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["score"] != -1:
                scores.setdefault(row["model"], []).append(float(row["score"]))
    return {model: sum(v) / len(v) for model, v in scores.items()}


# --------------------------------------------------------------------------------------------------------------------
# Reasoning accuracy with lm-eval
# --------------------------------------------------------------------------------------------------------------------


def arith_as_gsm8k(problems, path: str | Path) -> Path:
    """Write held-out verifiable problems (:class:`nca_kit.tasks.Problem` or a dataset with ``prompt``/``answer``)
    as GSM8K-form JSONL: ``{"question", "answer": "#### <number>"}`` per line."""
    from nca_kit.eval import problems_from

    return write_jsonl([{"question": p.question, "answer": f"#### {p.answer}"} for p in problems_from(problems)],
                       path)


def write_gsm8k_task(data_file: str | Path, folder: str | Path, *, name: str = "nca_kit_arith",
                     num_fewshot: int = 0, max_gen_toks: int = 64) -> Path:
    """An lm-eval task reading the GSM8K-form JSONL ``data_file``, written as ``<folder>/<name>.yaml``; pass
    ``folder`` as ``include_path`` to :func:`lm_eval_scores`.

    The task is lm-eval's GSM8K recipe on a local file: prompt ``"Question: ...\nAnswer:"``, greedy generation up to
    ``max_gen_toks`` tokens stopped at the next ``Question:`` or end of turn, target the number after ``####``, two
    filters — ``strict-match`` (the ``#### N`` the model wrote) and ``flexible-extract`` (the last number of the
    answer) — and exact match ignoring case, commas, ``$`` and a final period.
    """
    data_file = Path(data_file).resolve()
    if not data_file.exists():
        raise FileNotFoundError(f"data_file {str(data_file)!r} does not exist; write it with arith_as_gsm8k")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer.split('####')[-1].strip()}}",
        "num_fewshot": num_fewshot,
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                              "max_gen_toks": max_gen_toks},
        "filter_list": [
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"},
                                                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                     "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                    {"function": "take_first"}]},
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False,
                         "regexes_to_ignore": [",", r"\$", r"\.$"]}],
        "metadata": {"version": 1.0},
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return folder


def lm_eval_scores(model, tasks: list[str], *, tokenizer=None, include_path: str | Path | None = None,
                   limit: int | None = None, batch_size: int = 8, apply_chat_template: bool = False,
                   num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``model`` and return ``{task: {metric,filter: value}}`` (lm-eval's
    ``results``), plus ``"samples"`` (per-document generations, filtered answers and scores) when ``log_samples``.

    ``model``: an lm-eval ``LM``, or a transformers / PEFT model in memory (wrapped in lm-eval's ``HFLM`` with
    ``tokenizer``: the trained policy is evaluated with its adapter, nothing merged or saved). ``tasks``: lm-eval's
    built-in task names (:data:`TABLE3_TASKS`; online), or with ``include_path`` the names of the tasks under it
    (:func:`write_gsm8k_task`; offline, built-in tasks then not indexed). ``limit`` evaluates the first documents
    of each task only.
    """
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task")
    if not isinstance(model, LM):
        from lm_eval.models.huggingface import HFLM

        if tokenizer is None:
            raise ValueError("tokenizer is required to evaluate a transformers model with lm-eval")
        model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # Local tasks only: skip indexing lm-eval's thousands of built-in task files (seconds on a small CPU).
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                          include_defaults=include_path is None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks: unknown lm-eval task(s) {', '.join(unknown)}"
                         + (f" (none under include_path {str(include_path)!r})" if include_path else ""))
    out = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                                  log_samples=log_samples, bootstrap_iters=0)
    results = {task: {k: v for k, v in values.items() if k != "alias"} for task, values in out["results"].items()}
    if log_samples:
        results["samples"] = out["samples"]
    return results
