r"""Training: the config (paper Appendix C defaults), a ``transformers.Trainer`` whose loss is InfoNCA / NCA / DPO,
and :func:`train`, the entry point behind notebooks and ``python -m nca_kit.train``.

One optimizer step on a batch of ``B`` prompts with ``K`` responses each:

1. :func:`nca_kit.logps.sequence_logps` gives ``log pi_theta(y_i|x)`` ``(B, K)`` in one forward pass over all
   ``B*K`` sequences;
2. the reference ``log mu(y_i|x)`` ``(B, K)`` comes from a column computed once before training (``reference:
   cached``) or from a second, gradient-free forward with the LoRA adapters disabled (``reference: per_step``);
3. :func:`nca_kit.losses.reward_loss` (reward data) or :func:`nca_kit.losses.preference_loss` (pairwise data)
   turns them into per-prompt losses; their mean is the loss.

Everything else (AdamW, cosine schedule with warmup, gradient accumulation, bf16 autocast, several GPUs under
``accelerate launch``, checkpoints and resume, the progress bar) is ``transformers.Trainer``.

Logged every step (``metrics.jsonl`` in the output folder, one JSON object per line), each a mean over the prompts
of the step (all processes), responses ordered by their data reward, best first:

``loss``, ``learning_rate``, ``grad_norm``
    from the Trainer.
``rewards/A0`` ... ``rewards/A{K-1}``
    implicit rewards ``r_theta = beta * (log pi_theta - log mu)`` by data-reward rank (``A0`` = best response).
``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``
    implicit reward of the best and of the worst response; best minus the mean of the others; fraction of prompts
    whose best response has the strictly highest implicit reward.
``logps/chosen``, ``logps/rejected``
    ``log pi_theta(y|x)`` of the best / worst response (summed over tokens).
``logps/chosen_delta``, ``logps/rejected_delta``
    ``log pi_theta(y|x) - log mu(y|x)`` for the best / worst response: the change of its log-likelihood since
    step 0, because the reference is the step-0 policy (LoRA starts at zero; full fine-tuning starts from the
    reference). The likelihood trend of the paper's Fig. 2 / 5: it falls under DPO / InfoNCA and not under NCA.
``kl``
    ``mean_i [log pi_theta(y_i|x) - log mu(y_i|x)]`` over the dataset's responses. A log-ratio on *fixed*
    responses, not sampled from the policy: it estimates ``KL(pi_theta || mu)`` only for on-policy samples and
    ``-KL(mu || pi_theta)`` for samples from the reference. It shows how far the policy has moved on the data.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from nca_kit.config import REFERENCE_MODES, TrainConfig, coerce_value  # noqa: F401  (re-exported)
from nca_kit.data import load_training_dataset
from nca_kit.logps import (
    LayoutCollator,
    RewardCollator,
    has_adapters,
    reference_logps,
    sequence_logps,
    tokenize_reward_dataset,
    unwrap_model,
)
from nca_kit.losses import check_loss_type, device_checks, preference_loss, require, reward_loss
from nca_kit.packing import LayoutPlanner

__all__ = [
    "TrainConfig",
    "NCATrainer",
    "MetricsJsonlCallback",
    "TrainResult",
    "train",
    "prepare_data",
    "prepare_model",
    "build_trainer",
    "finish_run",
    "build_training_arguments",
    "read_metrics",
    "batch_metrics",
]

# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def prepare_data(config: TrainConfig, dataset=None):
    """``(dataset, kind)``: the training set in a canonical schema and ``"reward"`` or ``"pairwise"``.

    A passed ``dataset`` (notebooks, tests) must be canonical; otherwise ``config.dataset`` is read
    (``dataset_layout``, ``dataset_split``, ``data_kind``). Either way :func:`nca_kit.data.load_training_dataset`
    checks every row first (``on_invalid``), ``max_train_samples`` keeps the first N prompts and the loss must suit
    the kind of data.
    """
    layout = config.dataset_layout if dataset is None else None
    dataset, kind = load_training_dataset(config.dataset if dataset is None else dataset, layout=layout,
                                          split=config.dataset_split, data_kind=config.data_kind,
                                          max_samples=config.max_train_samples, on_invalid=config.on_invalid)
    check_loss_type(config.loss_type, kind)
    return dataset, kind


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def batch_metrics(policy: torch.Tensor, reference: torch.Tensor, model_rewards: torch.Tensor, rewards: torch.Tensor,
                  mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-batch metric sums and counts ``{name: (sum over prompts, number of prompts)}`` (see module docstring).

    All inputs ``(B, K)``; ``mask`` marks real responses. Responses are ranked by data reward, best first (stable:
    ties keep their order). Sums and counts, not means, so that steps and processes combine exactly. Both are 0-d
    float32 tensors on the inputs' device (nothing is read back to the host here).
    """
    policy, reference, model_rewards = policy.detach().float(), reference.detach().float(), model_rewards.float()
    rewards, mask = rewards.float(), mask.bool()
    b, k = rewards.shape
    key = torch.where(mask, rewards, torch.full_like(rewards, -math.inf))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, K): rank -> slot
    ranked_mask = mask.gather(-1, order)  # (B, K)
    ranked_rewards = model_rewards.gather(-1, order)  # (B, K)
    n_real = mask.sum(-1)  # (B,)
    last = (n_real - 1).clamp(min=0)[:, None]  # (B, 1): rank of the worst response
    best_slot, worst_slot = order[:, :1], order.gather(-1, last)  # (B, 1)
    delta = policy - reference  # (B, K)

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(name, values, valid):  # masked sums: no boolean indexing (its result size would need the host)
        out[name] = (torch.where(valid, values, torch.zeros_like(values)).sum(), valid.float().sum())

    for i in range(k):
        add(f"rewards/A{i}", ranked_rewards[:, i], ranked_mask[:, i])
    everyone = n_real >= 1  # rows without responses (padding across processes) count nowhere
    several = n_real >= 2  # margin and accuracy need a second response
    best_r = ranked_rewards[:, 0]
    rest_mask = ranked_mask.clone()
    rest_mask[:, 0] = False
    rest_sum = torch.where(rest_mask, ranked_rewards, torch.zeros_like(ranked_rewards)).sum(-1)
    rest_max = torch.where(rest_mask, ranked_rewards, torch.full_like(ranked_rewards, -math.inf)).max(-1).values
    add("rewards/chosen", best_r, everyone)
    add("rewards/rejected", model_rewards.gather(-1, worst_slot)[:, 0], everyone)
    add("rewards/margin", best_r - rest_sum / (n_real - 1).clamp(min=1), several)
    add("rewards/accuracy", (best_r > rest_max).float(), several)
    add("logps/chosen", policy.gather(-1, best_slot)[:, 0], everyone)
    add("logps/rejected", policy.gather(-1, worst_slot)[:, 0], everyone)
    add("logps/chosen_delta", delta.gather(-1, best_slot)[:, 0], everyone)
    add("logps/rejected_delta", delta.gather(-1, worst_slot)[:, 0], everyone)
    add("kl", torch.where(mask, delta, torch.zeros_like(delta)).sum(-1) / n_real.clamp(min=1), everyone)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class NCATrainer(Trainer):
    """``transformers.Trainer`` whose loss is a reward loss (InfoNCA, NCA, DPO pair baselines) or a preference loss
    (DPO, pairwise NCA, IPO) from :mod:`nca_kit.losses`.

    Expects batches from :class:`nca_kit.logps.RewardCollator` and ``TrainingArguments`` with
    ``remove_unused_columns=False`` (the collator needs every column). With ``pairwise=True`` every row holds
    ``[chosen, rejected]`` (K = 2) and :func:`~nca_kit.losses.preference_loss` is used.

    Args (besides the Trainer's):
        loss_type, alpha, beta: see :func:`nca_kit.losses.reward_loss` / ``preference_loss``.
        pairwise: rows are pairs (chosen first).
        average_logps: mean instead of sum over response tokens.
        reference_model: a frozen reference; ``None`` = the policy with its adapters disabled.
        logps_forward: layout of the policy and reference forwards (``forward`` of
            :func:`nca_kit.logps.sequence_logps`); ``"auto"`` (default) picks padded, packed or tree per batch.
    """

    def __init__(self, *args, loss_type: str = "nca", alpha: float = 0.01, beta: float = 0.01,
                 pairwise: bool = False, average_logps: bool = False, reference_model=None,
                 logps_forward: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("NCATrainer needs TrainingArguments(remove_unused_columns=False)")
        check_loss_type(loss_type, "pairwise" if pairwise else "reward")
        self.loss_type, self.alpha, self.beta = loss_type, alpha, beta
        self.pairwise, self.average_logps = pairwise, average_logps
        self.reference_model = reference_model
        self.logps_forward = logps_forward
        self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean: Trainer scales it for accumulation
        if logps_forward != "padded" and isinstance(self.data_collator, RewardCollator):
            # the layout chosen and planned on the host, in the DataLoader: the step reads nothing back
            planner = LayoutPlanner(self.model) if logps_forward == "auto" else None
            self.data_collator = LayoutCollator(self.data_collator, planner, layout=logps_forward)
        self._metric_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device tensors, read at logging
        self._computing_reference = False
        self._grouped_sampler: EpochLengthGroupedSampler | None = None
        self.add_callback(_SamplerEpoch(self))

    # -- loss -------------------------------------------------------------------------------------------------------

    def reference_logps(self, model, inputs) -> torch.Tensor:
        """``log mu`` ``(B, K)``: the cached column when the batch has it, else a gradient-free forward pass."""
        if "reference_logps" in inputs:
            return inputs["reference_logps"]
        if self.reference_model is None and not has_adapters(model) \
                and not self._computing_reference:
            raise ValueError("no reference: the batch has no cached reference_logps, the model has no adapters to "
                             "disable, and no reference_model was given (it would be the policy itself)")
        return reference_logps(model, inputs, reference_model=self.reference_model, average=self.average_logps,
                               forward=self.logps_forward)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with device_checks():  # value checks as device-side assertions: no host synchronisation in the step
            policy = sequence_logps(model, inputs, average=self.average_logps, forward=self.logps_forward)  # (B, K)
            reference = self.reference_logps(model, inputs).to(policy.dtype)  # (B, K)
            mask, rewards = inputs["response_mask"], inputs["rewards"]  # (B, K)
            if self.pairwise:
                message = "pairwise batches need exactly 2 responses (chosen, rejected) per prompt"
                if policy.shape[-1] != 2:
                    raise ValueError(message)
                require(mask.all(), message)
                losses, chosen, rejected = preference_loss(policy[:, 0], reference[:, 0], policy[:, 1],
                                                           reference[:, 1], beta=self.beta, loss_type=self.loss_type)
                model_rewards = torch.stack([chosen, rejected], dim=-1)  # (B, 2)
            else:
                losses, model_rewards = reward_loss(policy, reference, rewards, alpha=self.alpha, beta=self.beta,
                                                    loss_type=self.loss_type, mask=mask)
        loss = losses.mean()
        if model.training:
            self._store_metrics(policy, reference, model_rewards, rewards, mask)
        return (loss, {"policy_logps": policy, "model_rewards": model_rewards}) if return_outputs else loss

    def _store_metrics(self, policy, reference, model_rewards, rewards, mask):
        """Add this micro-batch's metric sums and counts to the running tensors; nothing leaves the device until
        :meth:`log` (several processes: each keeps its own prompts, summed across processes there)."""
        tensors = [t.detach() for t in (policy, reference, model_rewards, rewards)]
        for name, (total, count) in batch_metrics(*tensors, mask.bool()).items():
            if name in self._metric_sums:
                before_total, before_count = self._metric_sums[name]
                total, count = before_total + total, before_count + count
            self._metric_sums[name] = (total, count)

    def _reduce_metrics(self) -> dict[str, float]:
        """The means of the accumulated metrics over all processes: one read-back (and one collective for the names
        and one for the sums with several processes) per logging step."""
        names = sorted(self._metric_sums, key=_metric_order)
        if self.accelerator.num_processes > 1:  # K may differ between processes: agree on the names first
            from accelerate.utils import gather_object

            names = sorted(set(gather_object(names)), key=_metric_order)
        device = self.accelerator.device
        zero = torch.zeros((), device=device)
        sums = torch.stack([torch.stack([self._metric_sums.get(n, (zero, zero))[i].to(device) for n in names])
                            for i in (0, 1)]) if names else torch.zeros((2, 0), device=device)  # (2, names)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        totals, counts = sums.tolist()
        return {n: t / c for n, t, c in zip(names, totals, counts) if c}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metric_sums:
            logs.update(self._reduce_metrics())
            self._metric_sums.clear()
        super().log(logs, start_time)

    # -- length grouping that a checkpoint can restore ------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):  # its order must not hang on the global RNG (see the class)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # grouped by the global batch of an optimizer step (the Trainer's uses one process's share), so the
            # order, and every step's prompts, are the same whatever the number of processes
            step_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            sampler = self._grouped_sampler = EpochLengthGroupedSampler(step_batch, lengths=sampler.lengths, seed=seed)
        return sampler

    # -- cached reference through Trainer.predict (sharded over processes, gathered in order, cached per chunk) ------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self._computing_reference:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        inputs.pop("reference_logps", None)
        with self.compute_loss_context_manager():
            ref = self.reference_logps(model, inputs)  # (B, K)
        return None, ref.float(), inputs["row_index"]  # row indices come back as "labels": order-proof

    def precompute_reference_logps(self, dataset, batch_size: int | None = None, cache_dir=None,
                                   chunk_rows: int = 2048):
        """``dataset`` with a ``reference_logps`` column (K floats per row), computed once with ``Trainer.predict``.

        Same numbers as the per-step reference (same precision and autocast). The rows go through in chunks of
        ``chunk_rows`` prompts; within a chunk every process takes its share of the batches (a prompt's K responses
        stay together) and the results are gathered back in row order. With ``cache_dir`` the main process stores
        each finished chunk there (:class:`nca_kit.cache.Cache`, keyed by the chunk's token ids and a fingerprint
        of the reference weights), so an interrupted pass restarts at the first missing chunk and a rerun reads
        everything back. Memory holds one chunk's predictions and the final ``(N, K)`` float32 array.
        """
        from accelerate.utils import broadcast_object_list
        from tqdm.auto import tqdm

        from nca_kit.cache import Cache

        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
        if "reference_logps" in dataset.column_names:
            dataset = dataset.remove_columns("reference_logps")
        counts = _response_counts(dataset)  # (N,)
        values = np.zeros((len(dataset), int(counts.max(initial=0))), dtype=np.float32)  # (N, K_max)
        cache = Cache(cache_dir) if cache_dir is not None else None
        identity = self._reference_identity() if cache is not None else None
        main = self.accelerator.is_main_process
        chunks = range(0, len(dataset), chunk_rows)
        for start in tqdm(chunks, desc="reference log-probs", unit="chunk", disable=self.args.disable_tqdm or
                          not main or len(chunks) < 2):
            part = dataset.select(range(start, min(start + chunk_rows, len(dataset))))
            settings = stored = None
            shape = (len(part), int(counts[start : start + len(part)].max(initial=0)))  # what this chunk must hold
            if cache is not None:
                settings = {**identity, "rows": [start, start + len(part)], "tokens": _token_digest(part)}
                if main:  # verified by content, shape and dtype; anything else is recomputed with a warning
                    stored = cache.get_array("reference_logps", settings, shape=shape, dtype=np.float32)
                stored = broadcast_object_list([stored])[0]  # every process follows the main one's cache
            if stored is None:
                stored = self._predict_reference(part, batch_size)
                if cache is not None and main:
                    cache.array("reference_logps", settings, lambda: stored, shape=shape, dtype=np.float32)
            values[start : start + len(part), : stored.shape[1]] = stored
        self.accelerator.wait_for_everyone()
        self._forget_evaluation_preparation()
        mask = np.arange(values.shape[1])[None, :] < counts[:, None]  # (N, K_max): real responses
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[mask], type=pa.float32()))
        return dataset.add_column("reference_logps", column)

    def _predict_reference(self, part, batch_size: int | None) -> np.ndarray:
        """``(n, K_max)`` float32 reference log-probs of the rows of ``part``, in row order (padding: -100)."""
        old_bs, old_loss_only = self.args.per_device_eval_batch_size, self.args.prediction_loss_only
        self.args.per_device_eval_batch_size = batch_size or self.args.per_device_train_batch_size
        self.args.prediction_loss_only = False
        self._computing_reference = True
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):  # training randomness stays as if never run
                output = self.predict(part.add_column("row_index", np.arange(len(part))),
                                      metric_key_prefix="reference")
        finally:
            self._computing_reference = False
            self.args.per_device_eval_batch_size, self.args.prediction_loss_only = old_bs, old_loss_only
        rows = np.asarray(output.label_ids).reshape(-1)  # (n,): which row each prediction belongs to, any order
        if not np.array_equal(np.sort(rows), np.arange(len(part))):
            raise RuntimeError(f"reference pass returned rows {np.sort(rows)[:10]}... for {len(part)} rows")
        ordered = np.empty_like(output.predictions, dtype=np.float32)  # (n, K_max)
        ordered[rows] = output.predictions
        return ordered

    def _forget_evaluation_preparation(self) -> None:
        """``Trainer.predict`` before ``train`` has accelerate prepare the model for evaluation: marked prepared but
        not wrapped in ``DistributedDataParallel``. ``train`` would then skip the wrapper and every process would
        step on its own gradients. Dropping the mark lets ``train`` prepare (and wrap) the model as usual."""
        model = self.model
        if self.model_wrapped is model and getattr(model, "_is_accelerate_prepared", False):
            del model._is_accelerate_prepared
            self.accelerator._models[:] = [m for m in self.accelerator._models if m is not model]

    def _reference_identity(self) -> dict:
        """What the cached reference depends on besides the tokens: a fingerprint of the reference weights (their
        sums; LoRA weights excluded: disabled for the reference), the precision, and the averaging. Taken on the
        main process and shared, so every process reads the same cache entries."""
        from accelerate.utils import broadcast_object_list

        identity = None
        if self.accelerator.is_main_process:
            model = self.reference_model if self.reference_model is not None else unwrap_model(self.model)
            digest = hashlib.sha256()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" not in name:
                        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(p.detach().float().sum()):.9e}"
                                      .encode())
            identity = {"weights": digest.hexdigest()[:16], "model": type(model).__name__,
                        "average_logps": self.average_logps, "bf16": bool(self.args.bf16),
                        "fp16": bool(self.args.fp16)}
        return broadcast_object_list([identity])[0]

    def _rng_devices(self) -> list:
        if self.args.device.type == "cuda":
            return [self.args.device]
        return []

    # -- checkpoints carry the run's identity -----------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then ``run.json`` (the run identity, its settings and data digest) written last:
        a checkpoint without it is incomplete (:func:`nca_kit.run_folder.checkpoint_problem`)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from nca_kit.run_folder import write_run_record

        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            run_folder = getattr(self, "run_folder", None)
            record = run_folder.record() if run_folder is not None else {"identity": None, "settings": None,
                                                                           "data": None}
            write_run_record(folder, record)


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from its own generator seeded with ``seed + epoch``; ``batch_size`` is the global
    batch of one optimizer step (all processes x accumulation).

    The Trainer's ``LengthGroupedSampler`` draws from the global RNG when its iterator starts; a run resumed in a
    later epoch restores that RNG only after the iterator has started, so it replays another order than the
    uninterrupted run. Here the order of epoch ``e`` is a function of ``(seed, e)`` alone: the Trainer (through
    accelerate's data loader) calls :meth:`set_epoch` before every epoch, also when resuming, and every process
    draws the same order. accelerate then deals consecutive per-device batches of it to the processes, so a step
    trains on the same prompts with 1 or N processes.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int = 0):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class _SamplerEpoch(TrainerCallback):
    """Tells the trainer's length-grouped sampler which epoch begins. accelerate's ``set_epoch`` does not reach it
    when a resumed run skips the first batches of a data loader sharded over processes."""

    def __init__(self, trainer: "NCATrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer._grouped_sampler is not None:
            self.trainer._grouped_sampler.set_epoch(int(state.epoch + 1e-6))  # resumed: e.g. 1.33 -> epoch 1


def _response_counts(dataset) -> np.ndarray:
    """``(N,)`` number of responses of each tokenized row, read from Arrow without building Python lists."""
    table = dataset.select_columns(["response_input_ids"]).with_format("arrow")[:]
    return pc.list_value_length(table.column(0)).to_numpy().astype(np.int64)


def _token_digest(dataset) -> str:
    """Hash of the token ids of a tokenized dataset (prompts and responses, with their lengths)."""
    digest = hashlib.sha256()
    table = dataset.select_columns(["prompt_input_ids", "response_input_ids"]).with_format("arrow")[:]
    for column in table.columns:
        array = column.combine_chunks()
        while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            digest.update(pc.list_value_length(array).to_numpy(zero_copy_only=False).tobytes())
            array = pc.list_flatten(array)
        digest.update(array.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:16]


def _data_digest(dataset) -> str:
    """Hash of the tokenized training data: token ids (:func:`_token_digest`) and rewards (as float64)."""
    table = dataset.select_columns(["rewards"]).with_format("arrow")[:]
    rewards = pc.list_flatten(table.column(0).combine_chunks()).cast(pa.float64())
    lengths = pc.list_value_length(table.column(0).combine_chunks())
    digest = hashlib.sha256(_token_digest(dataset).encode())
    digest.update(lengths.to_numpy(zero_copy_only=False).tobytes())
    digest.update(rewards.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:16]


def _metric_order(name: str):
    if name.startswith("rewards/A"):
        return (0, int(name[len("rewards/A"):]), name)
    return (1, 0, name)


# --------------------------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------------------------


class _RunStart(TrainerCallback):
    """When training starts (data read, model loaded, reference computed, checkpoint restored): the run folder
    replaces a previous run's files and writes ``config.yaml`` and ``run.json``. Listed before the metrics callback."""

    def __init__(self, run_folder):
        self.run_folder = run_folder

    def on_train_begin(self, args, state, control, **kwargs):
        self.run_folder.start()


class MetricsJsonlCallback(TrainerCallback):
    """Append every log event to ``<output_dir>/metrics.jsonl`` (one JSON object per line, with ``step``).

    On (re)start, lines from steps after the current global step are dropped, so a resumed run continues the file
    exactly where its checkpoint was taken.
    """

    def __init__(self, path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if state.global_step:  # resuming: keep what was logged up to the checkpoint
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.global_step]
        with open(self.path, "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (an empty list when the file does not exist). A torn last line (a run killed
    while writing it) is left out with a warning; a damaged line before the last is an error naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if not any(rest.strip() for rest in lines[number:]):  # the last line, cut short by a kill mid-write
                warnings.warn(f"{path}: ignoring its torn last line {number} ({line[:40]!r}...)", stacklevel=2)
                break
            raise ValueError(f"{path} line {number} is not JSON ({line[:40]!r}...); the file is damaged") from None
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` leaves behind. ``metrics`` are the per-step records (rows of ``metrics.jsonl``)."""

    output_dir: Path
    config: TrainConfig
    metrics: list[dict]
    final_loss: float | None
    n_train_prompts: int
    adapter_dir: Path | None
    figure_path: Path | None
    steps: int | None = None  # optimizer steps of the run (the checkpoint's included when resumed)
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    trainer: Any = field(default=None, repr=False)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.metrics if "loss" in r]


def _world_size() -> int:
    """Processes of this run. The shared state is created with the Trainer's own device choice: created without
    ``cpu=True`` on a machine without CUDA it would ignore a ``torchrun`` group (every process training alone)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).num_processes


def _use_bf16(config: TrainConfig) -> bool:
    if config.bf16 is not None:
        return config.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build_training_arguments(config: TrainConfig) -> TrainingArguments:
    """``TrainingArguments`` for ``config``: batch size split into per-device size x accumulation x processes."""
    world = _world_size()
    per_step = config.per_device_batch_size * world
    if config.batch_size % per_step:
        raise ValueError(f"batch_size={config.batch_size} is not a multiple of per_device_batch_size x processes "
                         f"= {config.per_device_batch_size} x {world}")
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.reference_batch_size or config.per_device_batch_size,
        gradient_accumulation_steps=config.batch_size // per_step,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        optim=config.optim,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        bf16=_use_bf16(config),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        save_total_limit=config.save_total_limit,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_num_workers,
        report_to=config.report_to,
        disable_tqdm=config.disable_tqdm,
        ddp_find_unused_parameters=False if config.use_lora else None,
    )


def prepare_model(config: TrainConfig, model=None, tokenizer=None):
    """``(model, tokenizer, reference_model)`` for training.

    No ``model``: load ``config.model_name`` with LoRA, 4-bit and gradient checkpointing as configured
    (:func:`nca_kit.models.load_model`). A passed PEFT model trains its own adapters; a passed plain model gets LoRA
    adapters from the config when ``use_lora`` (PEFT injects them into that object: load a fresh model per run).
    ``reference_model`` is a frozen copy only for ``reference="per_step"`` without adapters; otherwise ``None`` (the
    reference is the policy with its adapters disabled).
    """
    from nca_kit.models import LoraSettings, load_model

    lora = (LoraSettings(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                         target_modules=config.lora_target_modules) if config.use_lora else None)
    if model is None:
        if config.quantize_4bit and config.compute_dtype is None:  # resolved here, so config.yaml states it
            from nca_kit.models import compute_dtype_for, default_device

            config.compute_dtype = str(compute_dtype_for(default_device())).removeprefix("torch.")
        model, tokenizer = load_model(config.model_name, quantize_4bit=config.quantize_4bit,
                                      double_quant=config.double_quant, lora=lora,
                                      gradient_checkpointing=config.gradient_checkpointing,
                                      compute_dtype=config.compute_dtype)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    elif lora is not None and not has_adapters(model):
        from peft import get_peft_model

        model = get_peft_model(model, lora.to_peft())  # adapters are injected into the passed model in place
    reference_model = None
    if config.reference == "per_step" and not has_adapters(model):
        reference_model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
    return model, tokenizer, reference_model


def build_trainer(config: TrainConfig, args: TrainingArguments, model, tokenizer, dataset, kind: str,
                  reference_model=None, callbacks=None, run_folder=None) -> NCATrainer:
    """Tokenize ``dataset`` and return the :class:`NCATrainer` ready to train (its ``train_dataset`` carries the
    cached reference log-probs when ``config.reference == "cached"``). ``config.yaml`` and ``run.json`` are written
    when training starts (``run_folder``, a :class:`nca_kit.run_folder.RunFolder`, checks the tokenized data
    against a checkpoint's first)."""
    from nca_kit.run_folder import RunFolder

    tokenized = tokenize_reward_dataset(dataset, tokenizer, max_prompt_length=config.max_prompt_length,
                                        max_length=config.max_length, overflow=config.overflow)
    if len(tokenized) == 0:
        raise ValueError("no training prompts left after tokenization")
    output_dir = Path(config.output_dir)
    if run_folder is None:
        run_folder = RunFolder(config, main_process=args.process_index == 0)
    run_folder.check_data(_data_digest(tokenized))
    trainer = NCATrainer(
        model=model,
        args=args,
        train_dataset=tokenized,
        data_collator=RewardCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[_RunStart(run_folder), MetricsJsonlCallback(output_dir / "metrics.jsonl"), *(callbacks or [])],
        loss_type=config.loss_type,
        alpha=config.alpha,
        beta=config.beta,
        pairwise=(kind == "pairwise"),
        average_logps=config.average_logps,
        reference_model=reference_model,
        logps_forward=config.logps_forward,
    )
    trainer.run_folder = run_folder
    if config.reference == "cached":
        trainer.train_dataset = trainer.precompute_reference_logps(tokenized, config.reference_batch_size,
                                                                   cache_dir=output_dir / "reference_logps",
                                                                   chunk_rows=config.reference_chunk_rows)
    return trainer


def finish_run(config: TrainConfig, trainer: NCATrainer) -> TrainResult:
    """Save the adapter (or model) and tokenizer, draw ``trends.png``, and read the logged metrics back."""
    output_dir = Path(config.output_dir)
    trainer.save_model(str(output_dir))
    figure_path = None
    metrics = read_metrics(output_dir / "metrics.jsonl")
    if trainer.is_world_process_zero() and config.save_figure:
        import matplotlib.pyplot as plt

        from nca_kit.plots import plot_training_trends

        figure_path = output_dir / "trends.png"
        fig = plot_training_trends(metrics, path=figure_path,
                                   title=f"{config.loss_type} on {Path(str(config.dataset)).name}")
        plt.close(fig)
    steps = [r for r in metrics if "loss" in r]
    return TrainResult(
        output_dir=output_dir,
        config=config,
        metrics=steps,
        final_loss=steps[-1]["loss"] if steps else None,
        n_train_prompts=len(trainer.train_dataset),
        adapter_dir=output_dir if has_adapters(trainer.model) else None,
        figure_path=figure_path,
        steps=int(trainer.state.global_step),
        model=trainer.model,
        tokenizer=trainer.processing_class,
        trainer=trainer,
    )


def train(config: TrainConfig, *, model=None, tokenizer=None, dataset=None, callbacks=None) -> TrainResult:
    """Run one training job and write its output folder; returns a :class:`TrainResult`.

    The steps, each a function of its own: :func:`prepare_data` (the canonical dataset and its kind),
    :func:`prepare_model` (model, tokenizer, reference), :func:`build_trainer` (tokenization, ``config.yaml``, the
    cached reference), ``trainer.train`` (resuming when asked), :func:`finish_run` (adapter, figure, metrics).

    ``model``/``tokenizer``/``dataset`` may be passed in (notebooks, tests); otherwise they are loaded from
    ``config.model_name`` / ``config.dataset``. A passed ``dataset`` is in the canonical reward or pairwise schema.
    Quantisation and gradient checkpointing of a passed model are the caller's (see
    :func:`nca_kit.models.load_model`). ``result.model`` is the trained model.

    The output folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, the PEFT adapter (or the full
    model without LoRA) with the tokenizer, ``trends.png``, ``checkpoint-*`` folders when ``save_steps > 0``, and
    ``reference_logps/`` (the cached reference, per chunk of prompts: a rerun or an interrupted pass reads it back).
    ``resume_from_checkpoint="latest"`` resumes from the newest complete checkpoint and refuses a folder holding a
    run without one. The folder belongs to this run (:mod:`nca_kit.run_folder`): locked while it trains, a resume
    must fit the checkpoint's settings and data, and a fresh run into another run's folder needs
    ``overwrite_output_dir``; ``run.json`` (identity, settings, data digest) is written there and into every
    checkpoint.
    """
    from transformers import set_seed

    from nca_kit.run_folder import RunFolder

    config.validate()  # a config changed after it was built is checked again, before any work
    set_seed(config.seed)  # before the adapters are created: their initialisation is part of the run
    args = build_training_arguments(config)
    run_folder = RunFolder(config, main_process=args.process_index == 0)
    with run_folder.lock():  # a second run into this folder fails here, at once
        resume = run_folder.resume_checkpoint()  # every check of the folder, before anything is read or written
        with _progress_bars(enabled=not config.disable_tqdm):
            dataset, kind = prepare_data(config, dataset)
            model, tokenizer, reference_model = prepare_model(config, model, tokenizer)
            trainer = build_trainer(config, args, model, tokenizer, dataset, kind, reference_model, callbacks,
                                    run_folder=run_folder)
            trainer.train(resume_from_checkpoint=resume)
            return finish_run(config, trainer)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """``disable_tqdm`` silences every bar of the run, not only the Trainer's: ``datasets`` (reading, ``map``
    during tokenization) and ``transformers`` (weight loading) too. Their global switches are restored afterwards."""
    if enabled:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on, transformers_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()
