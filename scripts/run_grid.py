#!/usr/bin/env python
"""Run the tiny-reproduction comparison grid: one :mod:`nca_kit.experiment` run per (method, K, seed), then one table
and figures.

    python scripts/run_grid.py --out runs/grid                      # headline: dpo, infonca, nca x seeds 0 1 2
    python scripts/run_grid.py --out runs/grid --full               # + dpo_x3, dpo_all_pairs, pair_nca, K = 2, 3
    python scripts/run_grid.py --out runs/grid --seeds 0 -p STEPS 12
    python scripts/run_grid.py --out runs/grid --collect-only --docs docs   # table + figures from finished runs
    python scripts/run_grid.py --out runs/grid --collect-only --records results/tiny_grid   # committed run records
    python scripts/run_grid.py --out runs/loop --sources rubric embedding_bt flr random --seeds 0 -p STEPS 12
    python scripts/run_grid.py --out runs/alpha_beta --alphas 0.01 0.1 1 --betas 0.01 0.1 1 --seeds 0 1  # Fig. 6/8

The planning, running and collection live in :mod:`nca_kit.grid`; this script parses the arguments. Each run is
:func:`nca_kit.experiment.run_experiment` on an :class:`~nca_kit.experiment.ExperimentSpec` (method, K,
seed, plus any ``-p NAME VALUE``: a spec field, or the notebook's upper-case parameter name such as ``STEPS``),
the same steps notebook 20 shows one by one. A run writes ``<out>/tiny_runs/<run>/`` (trainer output,
``metrics.jsonl``, ``results.json``: the record of :mod:`nca_kit.experiment`). A run whose ``results.json`` exists
is skipped, so an interrupted grid resumes; a run in progress in another grid process (``<run>.lock`` with a live
process id) is skipped, so two grid processes can share one output folder. Runs go seed by seed, so the first seed
of every method finishes first. A failed run is reported and the grid goes on; the exit status is non-zero if any
run failed. Every spec is validated before the first run starts.

Collected into ``<out>``: ``results.csv`` (one row per run, :func:`nca_kit.experiment.flat_row`),
``results_table.md`` (mean and [min, max] over seeds per method and K), ``results.png`` (held-out metrics, mean with
min-max bars), ``gain_vs_reward.png`` (when the runs use several reward sources: held-out gain over the base model
against the source's pairwise accuracy on the training answers, one marker per method, min-max bars over seeds),
``likelihood_trends.png`` (Fig. 5 at this scale: log-likelihood change of the best and worst training
answer, mean and min-max band over seeds) and ``k_ablation.png`` (Fig. 4: held-out metrics against K). ``--docs
DIR`` copies the figures there too.

``--sources`` sweeps reward sources (:data:`nca_kit.rewards.sources.REWARD_SOURCES`): every method and seed is run
once per source, seed by seed, so each method sees exactly the same source; the table then has one row per (method,
source).

``--alphas`` / ``--betas`` run the α × β robustness grid instead (:mod:`nca_kit.robustness`): InfoNCA and NCA at
every (α, β), DPO at every β, seed by seed, each run in ``<out>/alpha<α>_beta<β>/`` (DPO: ``<out>/beta<β>/``), and
collect ``alpha_beta.csv``, ``alpha_beta_table.md`` and one heat map per held-out metric
(``alpha_beta_<metric>.png``). It resumes the same way.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from nca_kit import grid  # noqa: E402


def main(argv=None) -> int:
    # peft reads transformers' renamed `is_gradient_checkpointing` (as in pytest's filter and nca_kit.train)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "grid")
    parser.add_argument("--methods", nargs="+", default=list(grid.HEADLINE))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--full", action="store_true", help="add dpo_x3, dpo_all_pairs, pair_nca and K = 2, 3")
    parser.add_argument("--ks", nargs="+", type=int, default=None, help="K ablation values (default with --full: 2 3)")
    parser.add_argument("--sources", nargs="+", default=None,
                        help="sweep these reward sources (nca_kit.rewards.sources.REWARD_SOURCES) for every method and "
                             "seed")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a setting of every run: an ExperimentSpec field or notebook 20's parameter name")
    parser.add_argument("--smoke", action="store_true", help="smoke sizes for every run (SMOKE_SIZES)")
    parser.add_argument("--alphas", nargs="+", type=float, default=None,
                        help="run the alpha x beta grid (Fig. 6/8) over these alphas (needs --betas)")
    parser.add_argument("--betas", nargs="+", type=float, default=None, help="the betas of the alpha x beta grid")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--docs", type=Path, default=None, help="also copy the figures into this folder")
    parser.add_argument("--docs-prefix", default="tiny_", help="file-name prefix of the figures copied to --docs")
    parser.add_argument("--records", type=Path, default=None,
                        help="also write each finished run's record (no weights, no local paths) into this folder, "
                             "e.g. results/tiny_grid or results/alpha_beta, which python -m nca_kit.report reads")
    args = parser.parse_args(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    alpha_beta = args.alphas is not None or args.betas is not None
    if alpha_beta and (args.alphas is None or args.betas is None):
        parser.error("the alpha x beta grid needs both --alphas and --betas")
    if not args.collect_only:
        methods = list(args.methods) + ([m for m in grid.EXTRA if m not in args.methods] if args.full else [])
        ks = args.ks if args.ks is not None else ([2, 3] if args.full else [])
        params = {name: grid.parse_value(value) for name, value in args.param}
        if args.sources and (args.full or ks or alpha_beta):
            raise SystemExit("error: --sources runs every method at K = 4; leave out --full, --ks, --alphas, --betas")
        if alpha_beta:
            runs = grid.alpha_beta_specs(args.alphas, args.betas, args.seeds, args.methods, params, args.smoke)
        else:
            planned = (grid.plan_sources(methods, args.seeds, args.sources) if args.sources
                       else grid.plan_methods(methods, args.seeds, ks))
            runs = grid.specs(planned, params, args.smoke)
        failed = grid.run_all(runs, out, params, alpha_beta=alpha_beta)
    if alpha_beta:
        grid.collect_alpha_beta(out, args.docs, args.records)
    else:
        grid.collect(out, args.docs, args.docs_prefix, args.records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
