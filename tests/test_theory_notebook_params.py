"""The theory notebooks (01-03) run at settings other than their defaults, as their exercises and the README invite.

Each case executes a notebook's code cells top to bottom in smoke mode with papermill's semantics (the parameters
cell, then the overrides, then the rest), in this process: no kernel start, so a handful of cases fit in about a
minute. Every in-notebook ``assert`` must hold, and a bad parameter must stop the notebook in the validation cell
with a ``ValueError`` naming it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import nbformat
import pytest
import torch

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

NOTEBOOKS = {"01": "01_dpo_to_infonca.ipynb", "02": "02_nca.ipynb", "03": "03_appendix_h_toy.ipynb"}


def execute(notebook: str, through: int | None = None, **parameters) -> dict:
    """Run ``notebook``'s code cells with ``parameters`` injected after its parameters cell; return its namespace.

    ``through``: stop after the cell with this index (2 is the check cell). Raises what the failing cell raised,
    with the cell's index added to the message.
    """
    import matplotlib.pyplot as plt

    nb = nbformat.read(str(NOTEBOOK_DIR / NOTEBOOKS[notebook]), as_version=4)
    namespace: dict = {}
    for index, cell in enumerate(nb.cells):
        if through is not None and index > through:
            break
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("%"))
        try:
            exec(compile(source, f"{notebook}[cell {index}]", "exec"), namespace)
        except Exception as error:
            error.add_note(f"in cell {index} of {NOTEBOOKS[notebook]} with {parameters}")
            raise
        finally:
            plt.close("all")
        if "parameters" in cell.metadata.get("tags", []):
            unknown = set(parameters) - set(namespace)
            assert not unknown, f"{NOTEBOOKS[notebook]} has no parameters {sorted(unknown)}"
            namespace.update(parameters)
    return namespace


@pytest.fixture
def in_process(notebook_env, monkeypatch):
    """Smoke mode (also under ``NOTEBOOKS=full``: these cases check settings, the full sizes are nbval's job), figures
    into a temporary folder, a non-interactive backend, and torch's thread count restored."""
    monkeypatch.setenv("NCA_KIT_SMOKE", "1")
    monkeypatch.chdir(NOTEBOOK_DIR)
    backend, threads = matplotlib.get_backend(), torch.get_num_threads()
    matplotlib.use("Agg")
    yield
    torch.set_num_threads(threads)
    matplotlib.use(backend)


# Settings the audit found failing (README example, the notebooks' own lists, small/large alpha, beta != 1).
CASES = [
    ("01", {"ALPHA": 0.1, "K": 6}),
    ("01", {"ALPHA": 20.0, "BETA": 0.5, "K": 2}),
    ("02", {"ALPHA": 0.1}),
    ("02", {"ALPHA": 0.3, "K": 2}),
    ("02", {"ALPHA": 2.0, "K": 6}),
    ("03", {"ALPHA": 0.5, "STEPS": 400}),
    ("03", {"ALPHA": 2.0, "BETA": 0.5}),
    ("03", {"ALPHA": 0.1, "BETA": 2.0}),
]


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("notebook, parameters", CASES, ids=[f"{nb}-{p}" for nb, p in CASES])
def test_theory_notebook_holds_at_other_settings(in_process, notebook, parameters):
    namespace = execute(notebook, **parameters)
    assert namespace["SMOKE"], "the test runs the notebooks in smoke mode"


@pytest.mark.notebook
@pytest.mark.parametrize("notebook, parameters, name", [
    ("01", {"K": 1}, "K"),
    ("02", {"ALPHA": 0.0}, "ALPHA"),
    ("03", {"STEPS": 10}, "STEPS"),
    ("03", {"ALPHAS": [5.0, 2.0]}, "ALPHAS"),
])
def test_theory_notebook_rejects_bad_parameters(in_process, notebook, parameters, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        execute(notebook, **parameters)


# --------------------------------------------------------------------------------------------------------------------
# Every parameter checked for type and range in the check cell (third cell), before any work, in one line
# --------------------------------------------------------------------------------------------------------------------

CHECK_CELL = 2

BAD_PARAMETERS = [
    # 01: K 100 enumerates 5^100 tuple codes (int64 overflow), K 2.5 and the strings failed late or never
    ("01", {"K": 100}, "K"),
    ("01", {"K": 2.5}, "K"),
    ("01", {"K": 3.0}, "K"),
    ("01", {"SEED": "x"}, "SEED"),
    ("01", {"SEED": -1}, "SEED"),
    ("01", {"ALPHA": "abc"}, "ALPHA"),
    ("01", {"ALPHA": float("inf")}, "ALPHA"),
    ("01", {"BETA": float("inf")}, "BETA"),
    ("01", {"REWARD_SCALE": None}, "REWARD_SCALE"),
    ("01", {"N_RESPONSES": 1000}, "N_RESPONSES"),
    ("01", {"N_RESPONSES": 50, "K": 6}, "K"),  # 50^6 tuples for 400 000 draws: the chi-square test has no group
    ("01", {"BETA": 10.0}, "BETA"),
    ("01", {"N_DRAWS": 1e6}, "N_DRAWS"),
    ("01", {"N_DRAWS": 10**9}, "N_DRAWS"),  # memory: ~ 150 GB of draws
    ("01", {"SMOKE": "yes"}, "SMOKE"),
    # 02: K 100 or N_RESPONSES 1000 enumerated itertools.product(range(n), repeat=k) until the kernel was killed
    ("02", {"K": 100}, "K"),
    ("02", {"K": 8}, "K"),  # memory: 5^8 tuples ~ 1.7 GB
    ("02", {"N_RESPONSES": 30}, "K"),  # memory: 30^4 tuples ~ 1.9 GB
    ("02", {"N_RESPONSES": 1000}, "N_RESPONSES"),
    ("02", {"SEED": "x"}, "SEED"),
    ("02", {"ALPHA": "abc"}, "ALPHA"),
    ("02", {"PAPER_ALPHA": "0.01"}, "PAPER_ALPHA"),
    ("02", {"N_PROMPTS": 2000.0}, "N_PROMPTS"),
    ("02", {"N_PROMPTS": 10**9}, "N_PROMPTS"),
    ("02", {"N_DRAWS": 10**10}, "N_DRAWS"),
    # 03
    ("03", {"ALPHA": "abc"}, "ALPHA"),
    ("03", {"SEED": "x"}, "SEED"),
    ("03", {"STEPS": 300.0}, "STEPS"),
    ("03", {"STEPS": 10**9}, "STEPS"),
    ("03", {"LR": -1.0}, "LR"),
    ("03", {"ALPHAS": "2, 5"}, "ALPHAS"),
    ("03", {"ALPHAS": [2.0, "x"]}, r"ALPHAS\[1\]"),
    ("03", {"BETAS": [0.0]}, r"BETAS\[0\]"),
    ("03", {"FEATURE_DIMS": [1, 2.5]}, r"FEATURE_DIMS\[1\]"),
    ("03", {"N_MAPS": 10**7}, "N_MAPS"),  # memory of the random-map study
]


@pytest.mark.notebook
@pytest.mark.parametrize("notebook, parameters, name", BAD_PARAMETERS,
                         ids=[f"{nb}-{p}" for nb, p, _ in BAD_PARAMETERS])
def test_check_cell_refuses_bad_type_or_range_in_one_line(in_process, notebook, parameters, name):
    with pytest.raises(ValueError, match=rf"^{name} must") as caught:
        execute(notebook, through=CHECK_CELL, **parameters)
    assert "\n" not in str(caught.value), "the error must be one line"
    assert f"cell {CHECK_CELL} " in caught.value.__notes__[0], "the check cell must stop it, before any work"


# The edges of the stated ranges are accepted, and a step beyond each is refused.
EDGES = [
    ("01", {"K": 6, "ALPHA": 0.05, "BETA": 0.01, "SEED": 2**32 - 1}, {"K": 7, "ALPHA": 0.049, "BETA": 0.009, "SEED": 2**32}),
    ("01", {"N_RESPONSES": 50, "K": 2, "REWARD_SCALE": 10, "BETA": 1}, {"N_RESPONSES": 51, "REWARD_SCALE": 10.01, "BETA": 1.01}),
    ("02", {"K": 7, "N_RESPONSES": 5, "PAPER_ALPHA": 1e-4, "ALPHA": 100}, {"K": 8, "PAPER_ALPHA": 9e-5, "ALPHA": 101}),
    ("03", {"ALPHA": 0.01, "BETA": 2, "ALPHAS": [0.1, 20], "BETAS": [0.5, 2], "FEATURE_DIMS": [1, 1024], "STEPS": 100},
     {"ALPHA": 20.1, "BETA": 0.49, "ALPHAS": [0.09, 20], "BETAS": [2.01], "FEATURE_DIMS": [1025], "STEPS": 99}),
]


@pytest.mark.notebook
@pytest.mark.parametrize("notebook, edges, beyond", EDGES, ids=[f"{nb}-{e}" for nb, e, _ in EDGES])
def test_check_cell_accepts_the_edges_of_the_stated_ranges_and_nothing_beyond(in_process, notebook, edges, beyond):
    namespace = execute(notebook, through=CHECK_CELL, **edges)
    assert namespace["world"] is not None
    for name, value in beyond.items():
        with pytest.raises(ValueError, match=rf"^{name}(\[\d+\])? must"):
            execute(notebook, through=CHECK_CELL, **{**edges, name: value})


def test_exact_enumeration_refuses_above_the_memory_bound():
    from nca_kit import exact, toy
    from nca_kit.notebook_params import MEMORY_LIMIT_BYTES

    world = toy.make_world(5, 0)
    assert exact.tuples_bytes(5, 7) < MEMORY_LIMIT_BYTES < exact.tuples_bytes(5, 8)
    with pytest.raises(ValueError, match=r"^k must be smaller: enumerating all 5\^100 ordered tuples"):
        exact.expected_reward_loss(world, torch.zeros(5, dtype=torch.float64), k=100, alpha=1.0, loss_type="nca")
    with pytest.raises(ValueError, match=r"^k must be smaller"):
        exact.nca_finite_k_minimiser(toy.make_world(1000, 0), 8, 1.0)
    import numpy as np
    with pytest.raises(ValueError, match=r"^k must be smaller: the 5\^28 ordered tuples do not fit"):
        exact.simulate_infonce(world, 28, 10, 1.0, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------------------
# Lecture 03: how the reward-data losses rank Table 10's policies (strict where strict, ties where they tie)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2, 1.0, 5.0, 100.0, 1000.0])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_reward_losses_rank_table10_as_the_lecture_states(alpha, beta):
    from nca_kit import toy

    world = toy.paper_world()
    scenario = toy.scenario_policies(world)
    table = toy.table10(world, beta=beta, alpha=alpha)
    for loss, column in (("infonca", "InfoNCA loss (rewards)"), ("nca", "NCA loss (rewards)")):
        d12 = table.loc["(1)", column] - table.loc["(2)", column]
        d23 = table.loc["(2)", column] - table.loc["(3)", column]
        closed_form = toy.swap_gap(world, scenario["(1)"], scenario["(2)"], loss, alpha=alpha, beta=beta)
        assert closed_form > 0, "(1) - (2) is positive in exact arithmetic at every alpha and beta"
        assert abs(d12 - closed_form) < 1e-12, "the computed difference must be the closed form up to round-off"
        if alpha <= 0.05:
            assert abs(d12) < 1e-15 and closed_form < 1e-20, "at small alpha (1) and (2) tie in float64"
        if alpha >= 0.2:
            assert d12 > 0, "above round-off the ranking of (1) and (2) must be strict"
        assert d23 > 1e-6, "(3) must have the strictly lowest loss"


def test_lecture_03_states_the_tie_at_the_papers_alpha(in_process, capsys):
    execute("03", through=9, ALPHA=0.01)
    printed = capsys.readouterr().out
    assert "InfoNCA loss (rewards): (1) - (2) =" in printed and "a tie (below round-off)" in printed
    execute("03", through=9, ALPHA=1.0)
    printed = capsys.readouterr().out
    assert "a tie" not in printed and printed.count("strict;") == 2


def test_lecture_03_refuses_a_tie_where_the_ranking_is_strict(in_process, monkeypatch):
    """A table whose (1) and (2) reward losses tie at alpha = 1 (the closed-form gap there is 0.016) must fail the
    check; a non-strict monotone check lets it pass."""
    from nca_kit import toy

    real = toy.table10

    def tied(world, **kwargs):
        table = real(world, **kwargs)
        if kwargs.get("alpha") is not None:
            table.loc["(1)", "NCA loss (rewards)"] = table.loc["(2)", "NCA loss (rewards)"]
        return table

    monkeypatch.setattr(toy, "table10", tied)
    with pytest.raises(AssertionError, match="closed form"):
        execute("03", through=9, ALPHA=1.0)
