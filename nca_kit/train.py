"""Command line: ``python -m nca_kit.train --config configs/<name>.yaml [--key value ...]``.

Every key of :class:`nca_kit.training.TrainConfig` can be overridden: ``--learning_rate 1e-5``, ``--lora.r 8``
(dots and dashes read as underscores), ``--key=value``. Values are converted to the field's type (``true``/``false``
for booleans, ``none`` for optional fields, ``a,b,c`` or ``[a, b, c]`` for lists). An unknown key is an error that
lists the valid ones. Several GPUs: ``accelerate launch -m nca_kit.train --config ...``.

The output folder (``output_dir``) receives the PEFT adapter, ``metrics.jsonl``, ``config.yaml`` (the resolved
config), ``run.json`` (the run identity, :mod:`nca_kit.run_folder`) and ``trends.png``. Setup errors (missing model
or data, 4-bit where bitsandbytes cannot run, a locked or foreign output folder, ...) print one line and exit with status 1;
``NCA_KIT_DEBUG=1`` shows the traceback instead. Ctrl-C prints one line naming the checkpoint to resume from and
exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from nca_kit.config import TrainConfig  # light: the trainer's heavy imports wait until a valid config is read


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """``["--a", "1", "--b=x", "--flag"]`` -> ``{"a": "1", "b": "x", "flag": "true"}`` (keys validated later)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise SystemExit(f"error: expected --key value, got {token!r}")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value = "true"  # a bare --flag
            i += 1
        out[key] = value
    return out


def build_config(argv: list[str] | None = None) -> TrainConfig:
    """The resolved :class:`TrainConfig` from command-line arguments (``--config`` file, then overrides)."""
    parser = argparse.ArgumentParser(
        prog="python -m nca_kit.train",
        description="Train a language model with InfoNCA / NCA / DPO (nca-kit).",
        epilog="Any TrainConfig field can follow as --key value. Valid keys: " + ", ".join(TrainConfig.field_names()),
    )
    parser.add_argument("--config", help="YAML recipe (keys = TrainConfig fields); defaults = paper Appendix C")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    known, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if known.config:
            config = TrainConfig.from_yaml(known.config, overrides)
        else:
            config = TrainConfig.from_dict(overrides)
    except (KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        parser.error(str(message))
    except FileNotFoundError as err:
        parser.error(f"config file not found: {err.filename}")
    if known.print_config:
        print(config.to_yaml(), end="")
        raise SystemExit(0)
    return config


def main(argv: list[str] | None = None) -> int:
    # peft's PeftModel reads transformers' renamed `is_gradient_checkpointing` attribute (the kit uses the new names);
    # the same filter as pytest's (pyproject.toml), so a CLI run prints no FutureWarning it cannot act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    config = build_config(argv)
    from nca_kit.training import train

    try:
        result = train(config)
    except KeyboardInterrupt:
        if os.environ.get("NCA_KIT_DEBUG"):
            raise
        print(f"\ninterrupted; {_resume_hint(config)}", file=sys.stderr)
        return 130
    except (OSError, ImportError, RuntimeError, ValueError) as err:
        if os.environ.get("NCA_KIT_DEBUG"):
            raise
        print(f"error: {err}\n(set NCA_KIT_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"trained {result.steps} steps on {result.n_train_prompts} prompts; final loss {final}; "
          f"outputs in {result.output_dir}")
    return 0


def _resume_hint(config: TrainConfig) -> str:
    """One line: the checkpoint an interrupted run resumes from, or that there is none."""
    from nca_kit.run_folder import checkpoint_problem, checkpoints

    complete = [p for p in checkpoints(config.output_dir) if checkpoint_problem(p) is None]
    if not complete:
        return (f"no complete checkpoint in {config.output_dir} (save_steps={config.save_steps}); "
                f"rerun with --overwrite_output_dir true to start over")
    return f"resume from {complete[-1]} with the same command and --resume_from_checkpoint latest"


if __name__ == "__main__":
    sys.exit(main())
