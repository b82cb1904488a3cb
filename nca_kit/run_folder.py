"""A run folder belongs to one run: the lock, the run identity, resume checks and complete checkpoints.

* **Lock.** While a run writes ``output_dir`` it holds an exclusive ``flock`` on ``output_dir/.nca_kit.lock``
  (released by the kernel when the process ends, also on SIGKILL). A second run into a locked folder fails at once,
  before any model or data is loaded.
* **Identity.** ``run.json`` (:data:`RUN_FILE`) holds the run identity (:func:`nca_kit.config.run_identity`, the
  hash of the settings that change the result), those settings, and a digest of the tokenized training data. It is
  written into ``output_dir`` when training starts and into every checkpoint, last, after the Trainer's own files.
* **Resume** compares the new settings with the checkpoint's and refuses any difference outside
  :data:`nca_kit.config.RESUME_MAY_CHANGE`, listing the keys; ``max_steps`` below the checkpoint's step is refused;
  the tokenized data must have the checkpoint's digest.
* **A fresh run** into a folder holding another run's files (other settings, other data, or files of unknown
  origin) is refused unless ``overwrite_output_dir``. Nothing of the previous run is touched before the new run has
  started cleanly (data read, model loaded, reference computed): only then are its ``checkpoint-*`` folders,
  ``metrics.jsonl``, final weights and figure removed and the new ``config.yaml`` and ``run.json`` written.
* **Complete checkpoints** are judged by reading them (:func:`checkpoint_problem`); ``latest`` takes the newest
  complete one and names every newer one it skips, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path

from nca_kit.config import RESUME_MAY_CHANGE, TrainConfig, result_settings, run_identity

__all__ = ["RUN_FILE", "LOCK_FILE", "RunFolder", "checkpoint_problem", "checkpoints", "read_run_record",
           "RunFolderError"]

RUN_FILE = "run.json"
LOCK_FILE = ".nca_kit.lock"
#: Files of a run in its output folder (besides ``checkpoint-*``): what marks a folder as holding a run, and what a
#: fresh run replacing it removes once it has started. Tokenizer files and the PEFT model card are left alone.
RUN_OUTPUTS = ("run.json", "config.yaml", "metrics.jsonl", "trends.png", "adapter_model.safetensors",
               "adapter_config.json", "model.safetensors", "model.safetensors.index.json", "training_args.bin")
CHECKPOINT_PREFIX = "checkpoint-"


class RunFolderError(ValueError):
    """An output folder that this run may not use as asked (locked, another run's, a checkpoint that does not fit)."""


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------


def checkpoints(output_dir) -> list[Path]:
    """Every ``checkpoint-N`` folder of ``output_dir``, by step."""
    found = []
    if os.path.isdir(output_dir):
        for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
            tail = path.name[len(CHECKPOINT_PREFIX):]
            if path.is_dir() and tail.isdigit():
                found.append((int(tail), path))
    return [path for _, path in sorted(found)]


def _step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoint_problem(path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from (``None`` when it is complete).

    Read, not only listed: ``trainer_state.json`` and ``run.json`` parse and name this step, the weights
    (safetensors) parse to their full length, and the optimizer, scheduler and RNG states are whole archives
    (``torch.save`` writes a zip whose directory is at the end: a file cut short has none)."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save was interrupted)"
    try:
        step = json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"{state.name} is not readable ({type(err).__name__}: {err})"
    if path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX):].isdigit() \
            and step != _step(path):
        return f"{state.name} says step {step}, the folder step {_step(path)}"
    weights = [path / n for n in ("adapter_model.safetensors", "model.safetensors") if (path / n).is_file()]
    weights += sorted(path.glob("model-*-of-*.safetensors"))
    if not weights:
        return "no model weights (adapter_model.safetensors / model.safetensors)"
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                list(f.keys())
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            return f"{file.name} is not readable ({type(err).__name__}: {err})"
    archives = [path / "optimizer.pt", path / "scheduler.pt"]
    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth (nor rng_state_N.pth)"
    for file in [*archives, *rng]:
        if not file.is_file():
            return f"no {file.name}"
        try:
            with zipfile.ZipFile(file):
                pass
        except (zipfile.BadZipFile, OSError) as err:
            return f"{file.name} is not readable ({err})"
    record = path / RUN_FILE
    if not record.is_file():
        return f"no {RUN_FILE} (written last: the save was interrupted, or the checkpoint was not saved by nca-kit)"
    try:
        json.loads(record.read_text())["identity"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"{RUN_FILE} is not readable ({type(err).__name__}: {err})"
    return None


def read_run_record(folder) -> dict | None:
    """The ``run.json`` of a run folder or checkpoint (``None`` when absent or unreadable)."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def write_run_record(folder, record: dict) -> None:
    """Write ``run.json`` atomically (temporary file renamed into place)."""
    folder = Path(folder)
    tmp = folder / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    tmp.replace(folder / RUN_FILE)


# --------------------------------------------------------------------------------------------------------------------
# The folder of one run
# --------------------------------------------------------------------------------------------------------------------


class RunFolder:
    """The output folder of one run: :meth:`lock`, :meth:`resume_checkpoint` (all checks before any work),
    :meth:`check_data` (after tokenization), :meth:`start` (when training begins: replaces a previous run's files
    and writes ``config.yaml`` / ``run.json``) and :meth:`record` (what goes into every checkpoint)."""

    def __init__(self, config: TrainConfig, main_process: bool = True):
        self.config, self.main = config, main_process
        self.path = Path(config.output_dir)
        self.identity = run_identity(config)
        self.settings = result_settings(config)
        self.data_digest: str | None = None
        self.resume_from: str | None = None
        self._expected: dict | None = None  # the run record a resume or a same-run restart must match
        self._replace = False  # a fresh run: remove the previous run's files at start
        self._lock_file = None

    # -- lock ---------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's exclusive lock for the ``with`` block (only the main process takes it)."""
        if not self.main:
            yield
            return
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock
            yield
            return
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(f"output_dir {self.path} is in use by another run ({holder}); wait for it to end "
                                 f"or use another output_dir") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield
        finally:
            if created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:  # a run stopped before writing:
                (self.path / LOCK_FILE).unlink(missing_ok=True)  # leave no folder behind
                self.path.rmdir()
            handle.close()  # releases the lock

    # -- before any work --------------------------------------------------------------------------------------------

    def resume_checkpoint(self) -> str | None:
        """The checkpoint to resume from (``None``: a fresh run), after every check that needs no model or data.

        ``resume_from_checkpoint``: a folder (must be complete and fit these settings) or ``"latest"`` (the newest
        complete checkpoint of ``output_dir``; newer incomplete ones are skipped with a warning naming them and
        why). ``"latest"`` on a folder holding a run but no complete checkpoint is an error (training would start
        over). A fresh run into a folder holding another run is refused unless ``overwrite_output_dir``."""
        resume = self.config.resume_from_checkpoint
        chosen = None
        if resume is not None and resume != "latest":
            problem = checkpoint_problem(resume)
            if problem is not None:
                raise RunFolderError(f"resume_from_checkpoint={resume!r} is not a complete checkpoint: {problem}")
            chosen = str(resume)
        elif resume == "latest":
            found = checkpoints(self.path)
            for path in reversed(found):
                problem = checkpoint_problem(path)
                if problem is None:
                    chosen = str(path)
                    break
                warnings.warn(f"resume_from_checkpoint='latest': skipping incomplete {path.name} in {self.path}: "
                              f"{problem}", stacklevel=3)
            if chosen is None:
                if self._holds_run():
                    raise RunFolderError(
                        f"resume_from_checkpoint='latest' but {self.path} holds a run and no complete checkpoint "
                        f"(checkpoints are written only when save_steps > 0); training again would overwrite it: "
                        f"use another output_dir, or drop resume_from_checkpoint to retrain on purpose")
                warnings.warn(f"resume_from_checkpoint='latest': {self.path} has no run yet; starting fresh",
                              stacklevel=3)
        if chosen is not None:
            self._check_resume(Path(chosen))
        else:
            self._check_fresh()
        self.resume_from = chosen
        return chosen

    def _check_resume(self, checkpoint: Path) -> None:
        record = read_run_record(checkpoint) or {}
        theirs = record.get("settings") or {}
        ours = self.settings
        lines = _differences(theirs, ours, ignore=RESUME_MAY_CHANGE)
        if lines:
            raise RunFolderError(f"cannot resume from {checkpoint}: it was trained with other settings ({lines}); "
                                 f"only {', '.join(RESUME_MAY_CHANGE)} and the bookkeeping keys may change on resume. "
                                 f"Use the checkpoint's settings (its run.json), or another output_dir for a new run")
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        if self.config.max_steps != -1 and self.config.max_steps < step:
            raise RunFolderError(f"cannot resume from {checkpoint} (step {step}) with max_steps={self.config.max_steps}"
                                 f": the checkpoint is already past it; use max_steps >= {step}")
        if checkpoint.parent.resolve() == self.path.resolve():
            from nca_kit.training import read_metrics  # a corrupted metrics.jsonl fails here, before any work

            read_metrics(self.path / "metrics.jsonl")
        self._expected = record

    def _holds_run(self) -> bool:
        return bool(checkpoints(self.path)) or any((self.path / name).exists() for name in RUN_OUTPUTS)

    def _check_fresh(self) -> None:
        if not self._holds_run():
            return
        self._replace = True
        if self.config.overwrite_output_dir:
            return
        previous = self._previous_settings()
        if previous is None:
            raise RunFolderError(f"output_dir {self.path} holds files of a run whose settings are unknown (no "
                                 f"readable run.json or config.yaml); pass overwrite_output_dir=true to replace it, "
                                 f"or use another output_dir")
        lines = _differences(previous, self.settings)
        if lines:
            raise RunFolderError(f"output_dir {self.path} holds another run ({lines}); pass overwrite_output_dir=true "
                                 f"to replace it, resume_from_checkpoint=latest to continue it, or use another "
                                 f"output_dir")
        self._expected = read_run_record(self.path)  # the same settings: a restart of this run (its data checked)
        warnings.warn(f"{self.path} holds a run with these settings; starting it over (its files are replaced once "
                      f"training starts)", stacklevel=3)

    def _previous_settings(self) -> dict | None:
        record = read_run_record(self.path)
        if record and isinstance(record.get("settings"), dict):
            return record["settings"]
        try:
            return result_settings(TrainConfig.from_yaml(self.path / "config.yaml"))
        except Exception:  # noqa: BLE001  (absent, unreadable, or settings this version refuses)
            return None

    # -- after tokenization -----------------------------------------------------------------------------------------

    def check_data(self, digest: str) -> None:
        """Refuse training data other than the checkpoint's (resume) or the previous run's (same-settings restart)."""
        self.data_digest = digest
        expected = (self._expected or {}).get("data")
        if expected is not None and expected != digest and not (self._replace and self.config.overwrite_output_dir):
            what = f"the checkpoint {self.resume_from}" if self.resume_from else f"the run in {self.path}"
            raise RunFolderError(f"the training data (tokenized digest {digest}) differ from those of {what} "
                                 f"({expected}); pass the same data, or use another output_dir for a new run")

    # -- when training starts -----------------------------------------------------------------------------------------

    def record(self) -> dict:
        return {"identity": self.identity, "settings": self.settings, "data": self.data_digest}

    def start(self) -> None:
        """The run has started cleanly: replace a previous run's files (fresh run) and write ``config.yaml`` and
        ``run.json``."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if self._replace:
            for path in checkpoints(self.path):
                shutil.rmtree(path)
            for name in RUN_OUTPUTS:
                (self.path / name).unlink(missing_ok=True)
        self.config.to_yaml(self.path / "config.yaml")
        write_run_record(self.path, self.record())


_MISSING = "<absent>"


def _differences(old: dict, new: dict, ignore=()) -> str:
    """``"key: old -> new, ..."`` for every key whose value differs (absent counts as a value), or ``""``."""
    keys = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k, _MISSING) != new.get(k, _MISSING))
    return ", ".join(f"{k}: {_show(old.get(k, _MISSING))} -> {_show(new.get(k, _MISSING))}" for k in keys)


def _show(value) -> str:
    text = repr(value) if value != _MISSING else value
    return text if len(text) <= 60 else text[:57] + "..."
