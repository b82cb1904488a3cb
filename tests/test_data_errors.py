"""Bad input on every path into training: caught before anything trains, in one line naming the row or the line."""

from __future__ import annotations

import codecs
import gzip
import json
import logging
from pathlib import Path

import pytest

from nca_kit import data as D
from nca_kit.train import main
from nca_kit.training import TrainConfig, prepare_data

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")


def user(text):
    return {"role": "user", "content": text}


def reward_row(i, **changes):
    row = {"id": f"r{i}", "prompt": [user(f"question {i}")], "responses": ["a good answer", "a bad answer"],
           "rewards": [2.0, 1.0]}
    return {**row, **changes}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD = jsonl([reward_row(0), reward_row(1)])  # lines 1 and 2; the bad row below is line 3

BAD_ROWS = {  # canonical reward rows that must not train: (row 3, reason, where)
    "empty response": (reward_row(2, responses=["fine", "  "]), "empty_response", "r2[1]"),
    "prompt ends with an assistant turn": (
        reward_row(2, prompt=[user("q"), {"role": "assistant", "content": "a"}]), "malformed_conversation", "r2"),
    "same text, two rewards": (reward_row(2, responses=["same", "same"], rewards=[3.0, 1.0]), "duplicate_response",
                               "r2[1]"),
    "NaN reward": (reward_row(2, rewards=[float("nan"), 1.0]), "nan_reward", "r2[0]"),
    "scalar reward": (reward_row(2, rewards=3), "wrong_type", "r2"),
    "string responses and rewards": (reward_row(2, responses="ab", rewards="31"), "wrong_type", "r2"),
    "non-string response": (reward_row(2, responses=["fine", 7]), "wrong_type", "r2[1]"),
    "one response": (reward_row(2, responses=["only"], rewards=[1.0]), "too_few_responses", "r2"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_canonical_training_file_is_validated(tmp_path, case):
    row, reason, where = BAD_ROWS[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + jsonl([row]))
    with pytest.raises(D.InvalidRecordError) as err:
        D.load_training_dataset(str(path))
    assert (err.value.reason, err.value.where) == (reason, where)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    ds, kind = D.load_training_dataset(str(path), on_invalid="skip")
    assert kind == "reward" and ds["id"][:2] == ["r0", "r1"]


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_passed_dataset_is_validated_too(case):
    row, reason, where = BAD_ROWS[case]
    rows = [reward_row(0), reward_row(1), row]
    with pytest.raises(D.InvalidRecordError) as err:
        D.load_training_dataset(rows)
    assert (err.value.reason, err.value.where) == (reason, where)


def test_passed_hf_dataset_is_validated_by_prepare_data():
    ds = D.records_to_dataset([D.RewardRecord([user("q")], ["yes", " "], [1.0, 0.0], id="blank")])
    with pytest.raises(D.InvalidRecordError, match="empty_response at blank"):
        prepare_data(TrainConfig(dataset_layout=None), ds)
    with pytest.raises(ValueError, match="no valid training rows"):
        prepare_data(TrainConfig(dataset_layout=None, on_invalid="skip"), ds)


def test_identical_pair_in_a_canonical_pairwise_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = [{"id": "p0", "prompt": [user("q0")], "chosen": "yes", "rejected": "no"},
             {"id": "p1", "prompt": [user("q1")], "chosen": "same", "rejected": "same"}]
    path.write_bytes(jsonl(pairs))
    with pytest.raises(D.InvalidRecordError, match="identical_pair at p1"):
        D.load_training_dataset(str(path))
    ds, kind = D.load_training_dataset(str(path), on_invalid="skip")
    assert kind == "pairwise" and ds["id"] == ["p0"]


def test_repeated_response_with_equal_reward_is_kept_and_noted(caplog):
    # K samples of a policy may repeat a text; with one reward for both it is a valid draw, not a contradiction
    with caplog.at_level(logging.INFO, logger="nca_kit.data"):
        ds, report = D.load_reward_dataset([reward_row(0, responses=["42", "42", "41"], rewards=[9, 9, 1])],
                                           return_report=True)
    assert ds[0]["responses"] == ["42", "42", "41"] and report.notes["repeated_response"] == 1
    assert "repeated_response" in caplog.text


FILE_ERRORS = {  # bytes of line 3 (after two good lines) -> words the one-line message must hold
    "corrupt JSON": (b'{"id": "r2", "prompt": oops}\n', "line 3, column 24: invalid JSON"),
    "latin-1 bytes": (json.dumps(reward_row(2, responses=["caf\u00e9", "tea"]), ensure_ascii=False)
                      .encode("latin-1") + b"\n", "line 3: byte 0xe9 is not UTF-8"),
    "lone surrogate": (b'{"id": "r2", "prompt": [{"role": "user", "content": "q"}], "responses": ["x\\ud800", "y"], '
                       b'"rewards": [1, 0]}\n', "line 3: the escape \\ud800 is half of a UTF-16 surrogate pair"),
    "not an object": (b'["not", "a", "record"]\n', "line 3: a record must be a JSON object, got a list"),
}


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_unreadable_line_names_file_and_line(tmp_path, case):
    line, words = FILE_ERRORS[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + line)
    for load in (D.load_training_dataset, D.load_reward_dataset):
        with pytest.raises(D.DataFileError) as err:
            load(str(path))
        message = str(err.value)
        assert message.startswith(f"{path}, ") and words in message and "\n" not in message


def test_truncated_gzip_and_bom(tmp_path):
    whole = gzip.compress(jsonl([reward_row(i) for i in range(400)]))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(D.DataFileError, match=r"cut\.jsonl\.gz: the gzip stream ends early, after line \d+"):
        D.load_training_dataset(str(cut))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(codecs.BOM_UTF8 + GOOD)  # what some editors write: read as plain UTF-8
    assert D.load_training_dataset(str(bom))[0]["id"] == ["r0", "r1"]


def test_file_is_streamed_into_an_arrow_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD + b"{broken\n")
    rows = D.loaders._read_file(path)  # lazy: the good records come before the bad line is read
    assert [r["id"] for r in (next(rows), next(rows))] == ["r0", "r1"]
    with pytest.raises(D.DataFileError, match="line 3"):
        next(rows)
    path.write_bytes(GOOD)
    ds = D.load_reward_dataset(path)
    assert ds.cache_files and ds.cache_files[0]["filename"].endswith(".arrow")  # on disk, memory-mapped
    pairs = D.rewards_to_pairs(ds)
    assert pairs.cache_files and len(pairs) == 2


def test_argument_checks():
    with pytest.raises(ValueError, match="min_responses must be an integer >= 1, got 0"):
        D.load_reward_dataset([reward_row(0, responses=[], rewards=[])], min_responses=0)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="max_train_samples must be >= 1"):
        TrainConfig(max_train_samples=0)
    with pytest.raises(ValueError, match="max_train_samples must be >= 1"):
        D.load_training_dataset([reward_row(0)], max_samples=0)
    with pytest.raises(ValueError, match="on_invalid must be 'raise' or 'skip'"):
        TrainConfig(on_invalid="drop")


@pytest.mark.parametrize("case", ["NaN reward", "same text, two rewards"])
def test_cli_stops_before_training_with_one_line(tmp_path, capsys, case):
    data, out = tmp_path / "bad.jsonl", tmp_path / "run"
    data.write_bytes(GOOD + jsonl([BAD_ROWS[case][0]]))
    code = main(["--config", TINY, "--dataset", str(data), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {BAD_ROWS[case][1]} at {BAD_ROWS[case][2]} in {data}")
    assert "Traceback" not in err and not out.exists()  # no config.yaml / metrics.jsonl left behind


def test_cli_corrupt_file_is_one_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(GOOD + b'{"id": "r2", "prompt": oops}\n')
    assert main(["--config", TINY, "--dataset", str(data), "--output_dir", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {data}, line 3, column 24: invalid JSON")


# issue 24, item 6: rewards the loss cannot use exactly are refused at validation, the row named

@pytest.mark.parametrize("reward", [10**400, -(10**400), 2**60, "1e400", "-1e999"])
def test_a_reward_beyond_exact_float64_is_refused_naming_the_row(reward):
    row = {"id": "big", "prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"],
           "rewards": [1.0, reward]}
    with pytest.raises(ValueError, match=r"reward_out_of_range at big\[1\]"):
        D.load_training_dataset([row])
    skipped, _ = D.load_training_dataset([row, {**row, "id": "ok", "rewards": [1.0, 2**53]}], on_invalid="skip",
                                         min_responses=2)
    assert skipped["id"] == ["ok"]


def test_cli_huge_integer_reward_is_one_line(tmp_path, capsys):
    data = tmp_path / "big.jsonl"
    row = {"id": "huge", "prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"],
           "rewards": [1, 10**400]}
    data.write_bytes(GOOD + (json.dumps(row) + "\n").encode())
    assert main(["--config", TINY, "--dataset", str(data), "--output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: reward_out_of_range at huge[1]") and "Traceback" not in err
    assert len(err.splitlines()[0]) < 600 and not (tmp_path / "run").exists()
