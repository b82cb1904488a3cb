r"""Make a reward dataset from a model's own samples: K responses per prompt, scored by :mod:`nca_kit.tasks`.

This is the paper's data recipe (UltraFeedback: several completions per instruction, each given a scalar score) at
the scale of a laptop: the policy to be aligned, SmolLM2-135M-Instruct, answers each verifiable prompt K times at
temperature ~0.8, and the deterministic rubric of :func:`nca_kit.tasks.score` gives each answer a reward in [0, 10].

* :func:`build_reward_dataset` — sample (:func:`nca_kit.sampling.sample_responses`) + score, returned in the
  canonical reward schema (``prompt`` messages, ``responses``, ``rewards``) plus ``id``, ``kind``, ``answer``,
  ``truncated`` and ``source``.
* :func:`load_or_generate` — the cached entry point. A generated dataset is stored as one JSON file named by the
  hash of every setting that changes its content (:meth:`GenerationSettings.key`: model id, prompt and sampling
  seeds, prompt counts, K, temperature, top-p, max_new_tokens, batch size, prompt-template version), so a rerun
  with the same settings reads the file instead of sampling again, and a changed setting can never read a stale one.
  The key is :func:`nca_kit.cache.settings_key`; the file is not a :class:`nca_kit.cache.Cache` entry because it
  carries its settings inside (so a copy committed under ``data/`` needs no sidecar) and grows row by row while it
  is sampled (an interrupted generation resumes).
* :func:`reward_stats` — the numbers a reader should see before training on such data.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from nca_kit.cache import settings_key
from nca_kit.sampling import sample_responses
from nca_kit.tasks import CORRECT_THRESHOLD, PROMPT_TEMPLATE_VERSION, Problem, score, train_test_prompts

__all__ = [
    "GenerationSettings",
    "build_reward_dataset",
    "load_or_generate",
    "cache_path",
    "reward_stats",
    "SOURCE",
]

SOURCE = "nca-kit/arith"


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting that changes a generated reward dataset; :meth:`key` hashes them all (the cache key)."""

    model_id: str = "smollm2-135m-instruct"  # name passed to nca_kit.models.load_model (offline GGUF Q4_1)
    n_train: int = 300  # training prompts
    n_test: int = 100  # held-out prompts (disjoint question texts)
    prompt_seed: int = 0  # seed of nca_kit.tasks.make_prompts
    sample_seed: int = 0  # seed of the sampler (one derived seed per batch)
    k: int = 4  # responses per prompt (the paper's UltraFeedback has K = 4)
    temperature: float = 0.8  # sampling temperature
    top_p: float = 1.0  # nucleus sampling; 1.0 = plain temperature sampling
    max_new_tokens: int = 20  # answers are one short line; longer replies are cut and lose the brevity points
    batch_size: int = 64  # sequences per generate() call (batch composition changes the sampled text)
    share_prefix: bool = True  # encode each prompt once for its k samples (changes the random stream)
    template_version: str = PROMPT_TEMPLATE_VERSION  # questions, instruction and rubric version

    def key(self) -> str:
        """12 hex digits of the SHA-256 of the settings (sorted JSON, :func:`nca_kit.cache.settings_key`)."""
        return settings_key(asdict(self), length=12)

    def file_name(self) -> str:
        return f"arith_{_slug(self.model_id)}_k{self.k}_{self.key()}.json"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def build_reward_dataset(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    k: int = 4,
    temperature: float = 0.8,
    top_p: float = 1.0,
    max_new_tokens: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    share_prefix: bool = True,
    progress: bool = True,
    desc: str = "sampling",
) -> list[dict]:
    """Sample ``k`` responses per problem and score them; rows in the canonical reward schema (a list of dicts).

    Columns: ``prompt`` (messages), ``responses`` (k strings), ``rewards`` (k floats in [0, 10]), ``id``, ``kind``,
    ``answer`` (int), ``truncated`` (k bools) and ``source``.
    """
    texts, truncated = sample_responses(
        model, tokenizer, [p.messages for p in problems], k=k, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, share_prefix=share_prefix,
        progress=progress, desc=desc,
    )
    rows = []
    for problem, responses, cut in zip(problems, texts, truncated):
        rows.append({
            "prompt": problem.messages,
            "responses": responses,
            "rewards": [score(r, problem.answer, truncated=c).total for r, c in zip(responses, cut)],
            "id": problem.id,
            "kind": problem.kind,
            "answer": problem.answer,
            "truncated": cut,
            "source": SOURCE,
        })
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


def cache_path(settings: GenerationSettings, cache_dir: str | Path) -> Path:
    """Where :func:`load_or_generate` keeps the dataset of ``settings`` inside ``cache_dir``."""
    return Path(cache_dir) / settings.file_name()


def _read(path: Path, settings: GenerationSettings) -> dict[str, list[dict]]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise _BadCacheFile(f"it does not parse ({type(err).__name__}: {err})") from None
    stored = payload.get("settings", {}) if isinstance(payload, dict) else {}
    if stored != asdict(settings):
        raise ValueError(f"cached file {path.name} holds settings {stored}, not {asdict(settings)}; delete it")
    try:
        splits = {split: payload["splits"][split] for split in ("train", "test")}
    except (KeyError, TypeError):
        raise _BadCacheFile("it has no train and test splits") from None
    problem = _content_problem(settings, splits, payload.get("digest"))
    if problem is not None:
        raise _BadCacheFile(problem)
    return splits


class _BadCacheFile(ValueError):
    """A cached dataset file that is not the whole dataset of its settings (recomputed, with a warning)."""


def _splits_digest(splits) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _content_problem(settings: GenerationSettings, splits, digest: str | None) -> str | None:
    """Why ``splits`` are not the complete dataset of ``settings`` (``None`` when they are): the rows must be the
    expected prompts, in order, with ``k`` responses and rewards each, and match the digest written with them."""
    if digest is not None and digest != _splits_digest(splits):
        return "its rows do not match the digest written with them (edited or damaged)"
    train, test = train_test_prompts(settings.n_train, settings.n_test, seed=settings.prompt_seed)
    for name, rows, problems in (("train", splits["train"], train), ("test", splits["test"], test)):
        if not isinstance(rows, list) or len(rows) != len(problems):
            n = len(rows) if isinstance(rows, list) else "no"
            return f"its {name} split holds {n} rows, not the {len(problems)} of its settings"
        if [row.get("id") if isinstance(row, dict) else None for row in rows] != [p.id for p in problems]:
            return f"its {name} split holds other prompts than its settings make"
    for row in splits["train"]:
        if len(row.get("responses") or []) != settings.k or len(row.get("rewards") or []) != settings.k:
            return f"train row {row.get('id')} does not hold k = {settings.k} responses and rewards"
    return None


def _write(path: Path, settings: GenerationSettings, splits: dict[str, list[dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # One row per line keeps the file readable and its diffs small.
    lines = ['{"settings": ' + json.dumps(asdict(settings), sort_keys=True) + ',',
             ' "digest": "' + _splits_digest(splits) + '",', ' "splits": {']
    for s, split in enumerate(("train", "test")):
        lines.append(f'  "{split}": [')
        rows = splits[split]
        lines += ["   " + json.dumps(row, ensure_ascii=False) + ("," if i < len(rows) - 1 else "")
                  for i, row in enumerate(rows)]
        lines.append("  ]" + ("," if s == 0 else ""))
    lines.append(" }}")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def load_or_generate(
    settings: GenerationSettings = GenerationSettings(),
    *,
    cache_dir: str | Path | None = None,
    search_dirs: tuple[str | Path, ...] = (),
    model=None,
    tokenizer=None,
    progress: bool = True,
    verbose: bool = True,
    train_prefix: int | None = None,
):
    """The dataset of ``settings`` as a ``datasets.DatasetDict``: ``train`` (reward schema) and ``test`` (held out).

    ``train`` holds ``settings.n_train`` prompts with ``k`` scored samples each (:func:`build_reward_dataset`).
    ``test`` holds the ``settings.n_test`` held-out prompts with ``prompt``, ``answer``, ``id`` and ``kind`` only:
    they are for :func:`nca_kit.eval.evaluate`, which samples every evaluated model (the base model included)
    itself.

    Looks for the file :meth:`GenerationSettings.file_name` in ``search_dirs`` (e.g. the committed ``data/``) and
    then in ``cache_dir`` (default: the kit's cache, :func:`nca_kit.cache.default_cache_dir`); if absent, samples it (loading ``settings.model_id`` with
    :func:`nca_kit.models.load_model` unless ``model``/``tokenizer`` are given) and writes it to ``cache_dir``.
    Sampling goes batch by batch, each batch appended to ``<file>.partial.jsonl``, so an interrupted run resumes
    where it stopped. A file found is checked by content (its digest, the expected prompts in order, ``k`` responses
    each): a short, edited or damaged file is not used (a warning names it) and the dataset is generated again.
    The returned ``DatasetDict`` carries ``.cache_hit`` (bool), ``.path`` (its file) and
    ``.complete`` (False when only a prefix was returned).

    ``train_prefix=n`` asks only for the first ``n`` train rows. If the complete file is absent but the partial file
    of a generation in progress (or interrupted) already holds them, they are returned without sampling; otherwise
    only the chunks covering them are sampled, in memory (the partial file is left to its writer). Chunk seeds do
    not depend on the number of prompts, so these rows are exactly the first rows of the complete dataset.
    """
    if cache_dir is None:
        from nca_kit.cache import default_cache_dir

        cache_dir = default_cache_dir()
    name = settings.file_name()
    for folder in (*search_dirs, cache_dir):
        path = Path(folder) / name
        if path.exists():
            try:
                splits = _read(path, settings)
            except _BadCacheFile as err:
                warnings.warn(f"cached dataset {path}: {err}; not used (generated again into {cache_dir})",
                              stacklevel=2)
                continue
            hit = True
            break
    else:
        path = cache_path(settings, cache_dir)
        train, test = train_test_prompts(settings.n_train, settings.n_test, seed=settings.prompt_seed)
        if train_prefix is not None and train_prefix < settings.n_train:
            rows, hit = _train_prefix(settings, train, path, train_prefix, model, tokenizer, progress)
            splits = {"train": rows, "test": [_held_out_row(p) for p in test]}
            if verbose:
                print(f"reward dataset {name}: first {len(rows)} train rows "
                      f"{'read from a generation in progress' if hit else 'sampled'}")
            return _as_dataset_dict(splits, hit, path, complete=False)
        splits = {"train": _generate_train(settings, train, path, model, tokenizer, progress),
                  "test": [_held_out_row(p) for p in test]}
        _write(path, settings, splits)
        path.with_suffix(".partial.jsonl").unlink(missing_ok=True)
        hit = False
    if verbose:
        print(f"reward dataset {name}: {'read from cache' if hit else 'generated'}")
    if train_prefix is not None:
        splits = {**splits, "train": splits["train"][:train_prefix]}
    return _as_dataset_dict(splits, hit, path, complete=train_prefix is None or train_prefix >= settings.n_train)


def _as_dataset_dict(splits, hit, path, complete):
    import datasets

    dd = datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})
    dd.cache_hit, dd.path, dd.complete = hit, path, complete
    return dd


def _read_partial(settings, partial: Path) -> list[dict]:
    """Rows of a partial file written with ``settings`` (a half-written last line is ignored); [] otherwise."""
    if not partial.exists():
        return []
    rows = []
    for i, line in enumerate(partial.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # the writer is in the middle of this line
        if i == 0:
            if record.get("settings") != asdict(settings):
                return []
            continue
        rows.append(record)
    return rows


def _train_prefix(settings, problems, path, n, model, tokenizer, progress) -> tuple[list[dict], bool]:
    done = _read_partial(settings, path.with_suffix(".partial.jsonl"))
    if len(done) >= n:
        return done[:n], True
    per_chunk = max(1, settings.batch_size // settings.k)
    if model is None or tokenizer is None:
        from nca_kit.models import load_model

        model, tokenizer = load_model(settings.model_id, device="cpu")
    rows = []
    for c in range(0, math.ceil(n / per_chunk)):
        rows += build_reward_dataset(
            model, tokenizer, problems[c * per_chunk : (c + 1) * per_chunk], k=settings.k,
            temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size, seed=settings.sample_seed * 10_007 + c,
            share_prefix=settings.share_prefix, progress=progress, desc=f"train chunk {c}",
        )
    return rows[:n], False


def _held_out_row(problem: Problem) -> dict:
    return {"prompt": problem.messages, "id": problem.id, "kind": problem.kind, "answer": problem.answer,
            "source": SOURCE}


def _generate_train(settings, problems, path, model, tokenizer, progress) -> list[dict]:
    """Sample the train split chunk by chunk (``batch_size // k`` prompts each), resuming from the partial file."""
    from nca_kit.progress import progress as progress_lines

    partial = path.with_suffix(".partial.jsonl")
    done = _read_partial(settings, partial)
    per_chunk = max(1, settings.batch_size // settings.k)
    chunks = [problems[i : i + per_chunk] for i in range(0, len(problems), per_chunk)]
    n_done = len(done) // per_chunk  # resume at a whole chunk
    done = done[: n_done * per_chunk]
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n"
                               for x in [{"settings": asdict(settings)}, *done]))  # drops a half-written line
    if n_done < len(chunks) and (model is None or tokenizer is None):
        from nca_kit.models import load_model

        model, tokenizer = load_model(settings.model_id, device="cpu")
    rows = list(done)
    bar = progress_lines(total=len(chunks), initial=n_done, desc="sampling the train split", bar=progress,
                         unit="batch")
    for c in range(n_done, len(chunks)):
        new = build_reward_dataset(
            model, tokenizer, chunks[c], k=settings.k, temperature=settings.temperature, top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
            seed=settings.sample_seed * 10_007 + c, share_prefix=settings.share_prefix, progress=False,
        )
        with open(partial, "a") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in new)
        rows += new
        bar.update(1)
    bar.close()
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------------


def reward_stats(dataset) -> dict:
    """Summary of a reward dataset (rows with ``rewards``): what the training signal looks like.

    Keys: ``n_prompts``, ``n_responses``, ``mean_reward``, ``frac_correct`` (responses with reward >=
    :data:`~nca_kit.tasks.CORRECT_THRESHOLD`), ``frac_mixed`` (prompts with at least one correct *and* one wrong
    response: the prompts where correctness itself is contrasted), ``frac_all_tied`` (prompts whose K rewards are
    all equal: no signal for pair losses), ``frac_any_correct``, ``histogram`` (reward value -> count),
    ``frac_truncated``.
    """
    rewards = [list(map(float, r)) for r in dataset["rewards"]]
    flat = [x for row in rewards for x in row]
    if not flat:
        raise ValueError("dataset has no responses")
    correct = [[x >= CORRECT_THRESHOLD for x in row] for row in rewards]
    hist: dict[float, int] = {}
    for x in flat:
        hist[x] = hist.get(x, 0) + 1
    truncated = dataset["truncated"] if "truncated" in dataset.column_names else None
    return {
        "n_prompts": len(rewards),
        "n_responses": len(flat),
        "mean_reward": sum(flat) / len(flat),
        "frac_correct": sum(map(sum, correct)) / len(flat),
        "frac_any_correct": sum(any(c) for c in correct) / len(rewards),
        "frac_mixed": sum(any(c) and not all(c) for c in correct) / len(rewards),
        "frac_all_tied": sum(len(set(row)) == 1 for row in rewards) / len(rewards),
        "frac_truncated": (sum(map(sum, truncated)) / len(flat)) if truncated is not None else float("nan"),
        "histogram": dict(sorted(hist.items())),
    }

