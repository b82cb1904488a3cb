"""Shared fixtures.

Notebooks: a test that takes ``notebook_path`` runs once per notebook under ``notebooks/`` (test id: its name);
``notebook_env`` gives a test the environment the course notebooks expect under tests: the smoke switch on and
figures in a temporary folder.

Tiny models: ``tok`` (the tiny ChatML tokenizer), ``tiny`` (a tiny random model and its tokenizer), ``mixed_k_rows``
and ``tokenized`` (three reward rows with K = 3, 2, 4 and prompts of different lengths, raw and tokenized), each
fresh per test module. Helpers a module imports (``from conftest import msgs, perturb_lora``): :func:`msgs` (one
user turn) and :func:`perturb_lora` (non-zero LoRA B matrices, so the adapters change the output).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nca_kit.models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"


def committed_notebooks() -> list[Path]:
    """Every notebook under ``notebooks/`` (Jupyter's checkpoint copies excluded), sorted."""
    return sorted(p for p in NOTEBOOK_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def pytest_generate_tests(metafunc):
    if "notebook_path" in metafunc.fixturenames:
        paths = committed_notebooks()
        ids = [str(p.relative_to(NOTEBOOK_DIR).with_suffix("")) for p in paths]
        metafunc.parametrize("notebook_path", paths, ids=ids)


def notebook_mode() -> str:
    """``NCA_KIT_NOTEBOOKS``: ``smoke`` (default; ``make test``) or ``full`` (``make test NOTEBOOKS=full``, what CI
    runs: every course notebook in the size ``make demo`` runs it, compared with its stored outputs)."""
    mode = os.environ.get("NCA_KIT_NOTEBOOKS", "smoke").strip().lower() or "smoke"
    if mode not in ("smoke", "full"):
        raise pytest.UsageError(f"NCA_KIT_NOTEBOOKS must be 'smoke' or 'full', got {mode!r}")
    return mode


@pytest.fixture
def notebook_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for executing notebooks in a test: ``NCA_KIT_SMOKE=1`` (unless :func:`notebook_mode` is
    ``full``), ``NCA_KIT_OUT`` a fresh temporary folder, and no ``MPLBACKEND`` (a backend forced for scripts would
    keep figures out of the notebook outputs)."""
    if notebook_mode() == "full":
        monkeypatch.delenv("NCA_KIT_SMOKE", raising=False)
    else:
        monkeypatch.setenv("NCA_KIT_SMOKE", "1")
    monkeypatch.setenv("NCA_KIT_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return dict(os.environ)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and spares a CPU shared with other jobs. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def msgs(text: str) -> list[dict]:
    """One user turn: the chat messages of a prompt."""
    return [{"role": "user", "content": text}]


def perturb_lora(model, generator: torch.Generator, scale: float = 0.3):
    """Set every LoRA B matrix of ``model`` to ``scale * N(0, 1)`` draws from ``generator`` (fresh adapters have B = 0
    and change nothing), in parameter order; returns ``model``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def tok():
    """The tiny byte-level ChatML tokenizer (:func:`nca_kit.models.tiny_tokenizer`)."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    """``(model, tokenizer)``: a tiny random model (:func:`nca_kit.models.tiny_model`) sized to the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    return tiny_model(vocab_size=len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def mixed_k_rows() -> list[dict]:
    """Three reward rows, K = 3, 2, 4, prompts of different lengths: mixed K in one batch."""
    return [
        {"prompt": msgs("What is two plus two?"), "responses": ["Four.", "Five, I think.", "Two"],
         "rewards": [1.0, 0.2, 0.0]},
        {"prompt": msgs("Write a short poem about the sea, please, in four lines."),
         "responses": ["The sea is wide and blue, and deep.", "No."], "rewards": [3.0, 1.0]},
        {"prompt": msgs("hello"), "responses": ["hello there, how are you?", "yes", "maybe", "sorry"],
         "rewards": [4.0, 1.0, 2.0, 0.5]},
    ]


@pytest.fixture(scope="module")
def tokenized(tok, mixed_k_rows):
    """``mixed_k_rows`` tokenized (:func:`nca_kit.logps.tokenize_reward_dataset`, prompts <= 64, rows <= 128)."""
    import datasets

    from nca_kit.logps import tokenize_reward_dataset

    return tokenize_reward_dataset(datasets.Dataset.from_list(mixed_k_rows), tok, max_prompt_length=64,
                                   max_length=128)
