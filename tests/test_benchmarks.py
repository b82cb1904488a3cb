"""nca_kit.benchmarks: MT-bench / AlpacaEval answer files in the judges' schemas, and lm-eval exact match on a local
GSM8K-form task (hand-built answers through a stub model, then a real transformers model with a PEFT adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nca_kit import benchmarks as bm
from nca_kit.tasks import Problem

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_lora():
    from nca_kit.models import LoraSettings, load_model

    return load_model("tiny-llama", device="cpu", lora=LoraSettings())


def test_fixtures_follow_the_official_schemas():
    questions = bm.load_mt_bench_questions(REPO / "data" / "mt_bench_question.jsonl")
    assert len(questions) == 6 and all(len(q["turns"]) == 2 for q in questions)
    assert {q["category"] for q in questions} >= {"writing", "math", "reasoning", "coding"}
    rows = bm.load_alpaca_eval(REPO / "data" / "alpaca_eval.json", limit=4)
    assert len(rows) == 4 and set(rows[0]) == {"instruction", "output", "generator", "dataset"}
    assert bm.validate_answer_file(REPO / "data" / "alpaca_eval.json") == 6


def test_bad_question_file_names_the_line_and_field(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text('{"question_id": 1, "category": "math", "turns": ["a"]}\n{"question_id": "2", "turns": ["b"]}\n')
    with pytest.raises(ValueError, match="question.jsonl line 2: 'category' is a required property"):
        bm.load_mt_bench_questions(path)


def test_answer_files_validate_and_drop_into_the_judges(tiny_lora, tmp_path):
    model, tokenizer = tiny_lora
    questions = bm.load_mt_bench_questions(REPO / "data" / "mt_bench_question.jsonl", limit=3)
    answers = bm.mt_bench_answers(model, tokenizer, questions, model_id="nca-tiny", max_new_tokens=4,
                                  progress=False)
    path = bm.write_jsonl(answers, tmp_path / "model_answer" / "nca-tiny.jsonl")
    assert bm.validate_answer_file(path) == 3
    first = json.loads(path.read_text().splitlines()[0])
    assert first["question_id"] == 1 and first["model_id"] == "nca-tiny" and len(first["choices"][0]["turns"]) == 2

    rows = bm.load_alpaca_eval(REPO / "data" / "alpaca_eval.json", limit=2)
    outputs = bm.alpaca_eval_outputs(model, tokenizer, rows, generator="nca-tiny", max_new_tokens=4, progress=False)
    out = tmp_path / "alpaca_eval_nca-tiny.json"
    out.write_text(json.dumps(outputs))
    assert bm.validate_answer_file(out) == 2
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]
    assert all(o["generator"] == "nca-tiny" for o in outputs)


def test_validation_catches_what_the_judges_would_trip_on(tmp_path):
    good = {"question_id": 1, "answer_id": "a", "model_id": "m", "choices": [{"index": 0, "turns": ["x"]}],
            "tstamp": 1.0}
    cases = [({**good, "choices": [{"index": 0}]}, "'turns' is a required property"),
             ({k: v for k, v in good.items() if k != "model_id"}, "'model_id' is a required property")]
    for record, message in cases:
        path = bm.write_jsonl([good, record], tmp_path / "a.jsonl")
        with pytest.raises(ValueError, match=f"a.jsonl line 2: {message}"):
            bm.validate_answer_file(path)
    with pytest.raises(ValueError, match="appears twice"):
        bm.validate_answer_file(bm.write_jsonl([good, good], tmp_path / "b.jsonl"))
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "x", "output": 3, "generator": "m"}]))
    with pytest.raises(ValueError, match="c.json: 3 is not of type 'string'"):
        bm.validate_answer_file(tmp_path / "c.json")
    with pytest.raises(ValueError, match="path must end in .jsonl"):
        bm.validate_answer_file(tmp_path / "d.txt")


def test_mt_bench_scores_average_turns_and_skip_judge_failures(tmp_path):
    rows = [{"question_id": 1, "model": "a", "judge": ["gpt-4", "single-v1"], "score": 8.0, "turn": 1},
            {"question_id": 1, "model": "a", "judge": ["gpt-4", "single-v1-multi-turn"], "score": 6.0, "turn": 2},
            {"question_id": 2, "model": "a", "judge": ["gpt-4", "single-v1"], "score": -1, "turn": 1},
            {"question_id": 1, "model": "b", "judge": ["gpt-4", "single-v1"], "score": 3.0, "turn": 1}]
    path = bm.write_jsonl(rows, tmp_path / "gpt-4_single.jsonl")
    assert bm.mt_bench_scores(path) == {"a": 7.0, "b": 3.0}


@pytest.fixture(scope="module")
def arith_task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval")
    problems = [Problem("0", "add", "What is 3 + 4?", 7), Problem("1", "add", "What is 20 + 22?", 42),
                Problem("2", "add", "What is 600 + 634?", 1234), Problem("3", "sub", "What is 5 - 9?", -4)]
    data = bm.arith_as_gsm8k(problems, folder / "arith_gsm8k.jsonl")
    assert json.loads(data.read_text().splitlines()[2]) == {"question": "What is 600 + 634?", "answer": "#### 1234"}
    return bm.write_gsm8k_task(data, folder / "tasks", name="arith_test")


def test_lm_eval_exact_match_on_a_hand_built_case(arith_task):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra nca-kit[eval]")
    from lm_eval.api.model import LM

    canned = {"3 + 4": "3 plus 4 is 7.\n#### 7",  # right, in both filters
              "20 + 22": "It is 42.",  # right for the last number, but no '#### N': strict-match misses it
              "600 + 634": "#### 1,234",  # right: the comma is ignored
              "5 - 9": "#### 4"}  # wrong sign

    class Canned(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [next(v for k, v in canned.items() if k in r.args[0]) for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    scores = bm.lm_eval_scores(Canned(), ["arith_test"], include_path=arith_task, log_samples=True)
    assert scores["arith_test"]["exact_match,strict-match"] == pytest.approx(2 / 4)
    assert scores["arith_test"]["exact_match,flexible-extract"] == pytest.approx(3 / 4)
    assert len(scores["samples"]["arith_test"]) // 2 == 4  # one sample per document and filter
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        bm.lm_eval_scores(Canned(), ["no_such_task"], include_path=arith_task)


def test_lm_eval_scores_a_peft_model_in_memory(tiny_lora, arith_task):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra nca-kit[eval]")
    model, tokenizer = tiny_lora
    scores = bm.lm_eval_scores(model, ["arith_test"], tokenizer=tokenizer, include_path=arith_task, limit=2,
                               batch_size=2)
    assert 0.0 <= scores["arith_test"]["exact_match,flexible-extract"] <= 1.0
    assert hasattr(model, "disable_adapter"), "the adapter is kept, not merged"
