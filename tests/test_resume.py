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
