"""Resume and interruption on the tiny model: a checkpoint taken in a later epoch replays the uninterrupted run with
length grouping on, an interrupted save is skipped for the newest complete checkpoint, ``latest`` never retrains
over a finished run, and an interrupted reference pass restarts where it stopped."""

import json
import shutil

import datasets
import numpy as np
import pytest
from safetensors.torch import load_file

from nca_kit.training import train
from test_training import reward_rows, tiny_config

SETTINGS = dict(per_device_batch_size=2, batch_size=2, max_steps=10, save_steps=3, save_total_limit=None,
                lora_dropout=0.1, group_by_length=True, loss_type="nca")  # 8 prompts: 4 steps an epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def run(folder, **overrides):
    config = tiny_config(folder, **{**SETTINGS, **overrides})
    return train(config, dataset=datasets.Dataset.from_list(reward_rows(8)))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run: 10 steps over 2.5 epochs, checkpoints at steps 3, 6 and 9."""
    folder = tmp_path_factory.mktemp("full")
    return run(folder)


def interrupted_copy(full, folder, checkpoints, partial=(), last_logged_step=None):
    """A folder as a run killed after ``last_logged_step`` leaves it: the given checkpoints, ``partial`` ones
    without ``trainer_state.json`` (killed while saving), and the metrics logged so far."""
    folder.mkdir()
    for step in (*checkpoints, *partial):
        shutil.copytree(full.output_dir / f"checkpoint-{step}", folder / f"checkpoint-{step}")
    for step in partial:
        (folder / f"checkpoint-{step}" / "trainer_state.json").unlink()
    lines = (full.output_dir / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join(line for line in lines
                                                     if json.loads(line)["step"] <= last_logged_step) + "\n")
    (folder / "config.yaml").write_text((full.output_dir / "config.yaml").read_text())
    return folder


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def max_weight_diff(a, b):
    return max(float((adapter(a)[name] - adapter(b)[name]).abs().max()) for name in adapter(a))


def test_resume_in_the_second_epoch_with_length_grouping_equals_uninterrupted_run(full, tmp_path):
    assert len(full.losses) == 10 and full.metrics[-1]["epoch"] == pytest.approx(2.5)
    folder = interrupted_copy(full, tmp_path / "run", checkpoints=[6], last_logged_step=7)
    resumed = run(folder, resume_from_checkpoint="latest")  # checkpoint-6: epoch 2, after its second batch
    assert [m["step"] for m in resumed.metrics] == list(range(1, 11))
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert max_weight_diff(full.output_dir, folder) < 1e-6


def test_latest_skips_a_checkpoint_whose_save_was_interrupted(full, tmp_path):
    folder = interrupted_copy(full, tmp_path / "run", checkpoints=[3], partial=[6], last_logged_step=6)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run(tmp_path / "other", resume_from_checkpoint=str(folder / "checkpoint-6"))
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint-6 .*no trainer_state.json"):
        resumed = run(folder, resume_from_checkpoint="latest")
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert (folder / "checkpoint-6" / "trainer_state.json").is_file()  # saved again, complete this time


def test_latest_without_checkpoints_refuses_to_retrain_over_a_finished_run(tmp_path):
    finished = run(tmp_path, max_steps=2, save_steps=0)
    before = (tmp_path / "metrics.jsonl").read_text(), (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds a run and no complete checkpoint.*save_steps > 0"):
        run(tmp_path, max_steps=2, save_steps=0, resume_from_checkpoint="latest")
    after = (tmp_path / "metrics.jsonl").read_text(), (tmp_path / "adapter_model.safetensors").read_bytes()
    assert after == before and len(finished.losses) == 2
    with pytest.warns(UserWarning, match="has no run yet; starting fresh"):  # a first launch of a requeued job
        fresh = run(tmp_path / "new", max_steps=2, save_steps=0, resume_from_checkpoint="latest")
    assert fresh.losses == pytest.approx(finished.losses, abs=1e-6)


def test_interrupted_reference_pass_restarts_at_the_first_missing_chunk(tmp_path):
    """The cached reference, 3 prompts a chunk: a pass killed after its first chunk computes only the others."""
    from nca_kit.training import NCATrainer

    computed = []
    original = NCATrainer._predict_reference

    def counting(self, part, batch_size):
        computed.append(len(part))
        if len(computed) == 2 and interrupt:
            raise KeyboardInterrupt  # killed during the second chunk
        return original(self, part, batch_size)

    settings = dict(max_steps=1, save_steps=0, reference_chunk_rows=3)
    NCATrainer._predict_reference = counting
    try:
        interrupt = True
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "a", **settings)
        assert computed == [3, 3] and len(list((tmp_path / "a" / "reference_logps").glob("*.npy"))) == 1
        interrupt, computed[:] = False, []
        resumed = run(tmp_path / "a", **settings)
        assert computed == [3, 2]  # chunks 2 and 3 of 8 prompts; chunk 1 read back
        computed[:] = []
        fresh = run(tmp_path / "b", **settings)
        assert computed == [3, 3, 2]
    finally:
        NCATrainer._predict_reference = original
    cached = np.array([x for row in resumed.trainer.train_dataset["reference_logps"] for x in row])
    again = np.array([x for row in fresh.trainer.train_dataset["reference_logps"] for x in row])
    assert np.array_equal(cached, again) and resumed.losses == fresh.losses


# ------------------------------------------------------------------------------------------------------------------
# A run folder belongs to one run (issue 24, items 1-3 and 5)
# ------------------------------------------------------------------------------------------------------------------

from nca_kit.run_folder import LOCK_FILE, RunFolder, RunFolderError, checkpoint_problem  # noqa: E402


def snapshot(folder):
    """Every file of a run folder (checkpoints included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("short")
    run(folder, max_steps=4, save_steps=2)
    return folder


@pytest.mark.parametrize("change", [dict(beta=5.0), dict(lora_r=4), dict(loss_type="infonca"), dict(alpha=0.1),
                                    dict(learning_rate=1e-3, max_steps=8), dict(seed=1), dict(batch_size=4)])
def test_resume_with_other_result_settings_is_refused_naming_the_keys(short, tmp_path, change):
    """Item 1: a resume that changes what the run computes is refused, listing the keys; nothing is rewritten."""
    folder = tmp_path / "run"
    shutil.copytree(short, folder)
    before = snapshot(folder)
    keys = sorted(k for k in change if k != "max_steps")
    with pytest.raises(RunFolderError, match="trained with other settings .*" + ".*".join(keys)):
        run(folder, **{"max_steps": 4, "save_steps": 2, "resume_from_checkpoint": "latest", **change})
    assert snapshot(folder) == before  # config.yaml, metrics.jsonl, checkpoints untouched


def test_resume_with_other_data_is_refused_before_training(short, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(short, folder)
    before = snapshot(folder)
    rows = reward_rows(8)
    rows[0]["rewards"] = [1.0, 8.0]  # the same prompts, one reward changed
    with pytest.raises(RunFolderError, match="training data .* differ"):
        train(tiny_config(folder, **{**SETTINGS, "max_steps": 6, "save_steps": 2,
                                     "resume_from_checkpoint": "latest"}), dataset=datasets.Dataset.from_list(rows))
    assert snapshot(folder) == before


def test_resume_below_the_checkpoint_step_is_refused(short, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(short, folder)
    with pytest.raises(RunFolderError, match="step 4.*max_steps=3"):
        run(folder, max_steps=3, save_steps=2, resume_from_checkpoint="latest")


def test_resume_may_change_logging_saving_and_the_length(full, tmp_path):
    """The documented keys may change on resume: bookkeeping, and max_steps (here the same 10)."""
    folder = interrupted_copy(full, tmp_path / "run", checkpoints=[6], last_logged_step=6)
    resumed = run(folder, resume_from_checkpoint="latest", save_steps=5, logging_steps=1, save_total_limit=1,
                  reference_chunk_rows=3)
    assert resumed.steps == 10 and resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert json.loads((folder / "run.json").read_text())["identity"] == \
        json.loads((full.output_dir / "checkpoint-9" / "run.json").read_text())["identity"]


def test_fresh_run_into_another_runs_folder_is_refused_and_leaves_it_whole(short, tmp_path):
    """Item 2: run B into run A's folder is refused (A's metrics.jsonl was overwritten on main)."""
    folder = tmp_path / "run"
    shutil.copytree(short, folder)
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match="holds another run .*beta.*overwrite_output_dir"):
        run(folder, max_steps=4, save_steps=2, beta=0.5)
    with pytest.raises(RunFolderError, match="holds another run .*max_steps"):
        run(folder, max_steps=6, save_steps=2)
    (folder / "config.yaml").unlink()
    (folder / "run.json").unlink()
    with pytest.raises(RunFolderError, match="settings are unknown"):  # files of a run nobody can name
        run(folder, max_steps=4, save_steps=2)
    assert snapshot(folder) == {k: v for k, v in before.items() if k not in ("config.yaml", "run.json")}


def test_overwrite_replaces_the_previous_run_only_once_the_new_one_has_started(short, tmp_path):
    """Item 2: B with overwrite_output_dir, killed at step 3, resumed with `latest`: B's result, not A's (on main
    the resume picked A's newest checkpoint). A failing start of B leaves A whole."""
    folder = tmp_path / "run"
    shutil.copytree(short, folder)
    before = snapshot(folder)
    bad = reward_rows(8)
    bad[0]["rewards"] = [float("nan"), 1.0]
    with pytest.raises(ValueError, match="nan_reward"):  # B fails while reading its data: A is untouched
        train(tiny_config(folder, **{**SETTINGS, "max_steps": 6, "save_steps": 2, "beta": 0.5,
                                     "overwrite_output_dir": True}), dataset=datasets.Dataset.from_list(bad))
    assert snapshot(folder) == before

    b_settings = dict(max_steps=6, save_steps=2, beta=0.5, overwrite_output_dir=True)
    reference = run(tmp_path / "b_alone", **b_settings)

    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(folder, **{**SETTINGS, **b_settings}), dataset=datasets.Dataset.from_list(reward_rows(8)),
              callbacks=[Kill()])
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2"]  # A's checkpoints are gone
    resumed = run(folder, **b_settings, resume_from_checkpoint="latest")
    assert resumed.losses == pytest.approx(reference.losses, abs=1e-6)
    assert max_weight_diff(reference.output_dir, folder) < 1e-6


def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path):
    """Item 3: two runs into one folder at once; the second fails before loading anything and writes nothing."""
    import fcntl
    import subprocess
    import sys

    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(folder / LOCK_FILE)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242'); "
        "f.flush(); print('locked', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match="in use by another run"):
            run(folder, max_steps=2, save_steps=0)
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    done = run(folder, max_steps=2, save_steps=0)  # the holder is gone (killed): its lock went with it
    assert done.steps == 2
    with open(folder / LOCK_FILE) as f:  # and the finished run released it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_lock_is_held_for_the_whole_run(tmp_path):
    """A run in progress (seen from a callback at step 1) holds the lock: another RunFolder cannot take it."""
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                other = RunFolder(tiny_config(tmp_path, **SETTINGS))
                with pytest.raises(RunFolderError, match="in use"):
                    with other.lock():
                        pass
                seen.append(True)

    train(tiny_config(tmp_path, **{**SETTINGS, "max_steps": 2, "save_steps": 0}),
          dataset=datasets.Dataset.from_list(reward_rows(8)), callbacks=[Probe()])
    assert seen == [True]


TORN = ["trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors",
        "run.json"]


@pytest.mark.parametrize("name", TORN)
def test_a_checkpoint_with_a_torn_file_is_incomplete(full, tmp_path, name):
    """Item 5: a checkpoint is judged by reading it: any file cut short (a full disk) makes it incomplete."""
    folder = tmp_path / "checkpoint-6"
    shutil.copytree(full.output_dir / "checkpoint-6", folder)
    assert checkpoint_problem(folder) is None
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    assert name in checkpoint_problem(folder)
    (folder / name).unlink()
    assert name in checkpoint_problem(folder)


def test_latest_falls_back_past_a_torn_checkpoint(full, tmp_path):
    """Item 5: checkpoint-6 with a torn trainer_state.json: `latest` warns naming it and resumes from checkpoint-3
    (on main: a JSON error naming no file); naming it explicitly is an error naming the file."""
    folder = interrupted_copy(full, tmp_path / "run", checkpoints=[3, 6], last_logged_step=7)
    state = folder / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    with pytest.raises(RunFolderError, match="checkpoint-6.*trainer_state.json is not readable"):
        run(folder, resume_from_checkpoint=str(folder / "checkpoint-6"))
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint-6 .*trainer_state.json is not readable"):
        resumed = run(folder, resume_from_checkpoint="latest")
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)


def test_metrics_with_a_torn_last_line_resume(full, tmp_path):
    """Item 5: a kill while a metrics line was written leaves it torn: the resume drops it with a warning; a
    damaged line before the last is an error naming the file and line, before any work."""
    folder = interrupted_copy(full, tmp_path / "run", checkpoints=[6], last_logged_step=7)
    metrics = folder / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text + '{"step": 8, "loss": 1.')
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = run(folder, resume_from_checkpoint="latest")
    assert [m["step"] for m in resumed.metrics] == list(range(1, 11))
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)

    other = interrupted_copy(full, tmp_path / "damaged", checkpoints=[6], last_logged_step=7)
    lines = (other / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (other / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 3 is not JSON"):
        run(other, resume_from_checkpoint="latest")


def test_every_checkpoint_and_the_folder_carry_the_run_identity(full):
    from nca_kit.config import run_identity

    identity = run_identity(tiny_config(full.output_dir, **SETTINGS))
    for step in (3, 6, 9):
        record = json.loads((full.output_dir / f"checkpoint-{step}" / "run.json").read_text())
        assert record["identity"] == identity and record["data"] and record["settings"]["beta"] == 0.1
    assert json.loads((full.output_dir / "run.json").read_text())["identity"] == identity
