#!/usr/bin/env python
"""Build ``data/cache/``: the cache entries the course notebooks compute once and every run reuses, shipped with the
kit so that ``make demo`` on a fresh clone does not spend its time recomputing them.

    python scripts/build_shipped_cache.py                    # run the demo's notebooks cold, one by one, and ship
    python scripts/build_shipped_cache.py 10 11              # only these notebooks (others' entries are kept)
    python scripts/build_shipped_cache.py --check            # verify data/cache against its manifest, change nothing

What is shipped: every entry a notebook writes into an empty cache folder while running in full size with the shipped
entries switched off (``NCA_KIT_SHIPPED_CACHE=0``), except the kinds listed in ``NOT_SHIPPED`` (model copies,
generated datasets, which ``data/`` already holds) and any file over ``MAX_ENTRY_BYTES``. In practice: the MiniLM
embeddings of the fixed texts (notebooks 10 and 12), the follow-up likelihood scores of the fixed HH-RLHF pairs and
arithmetic answers (notebook 11), the rewards a source gives the training prompts and the base model's held-out
evaluation (notebooks 12 and 20). Each entry keeps its sidecar (the full settings that produced it and the SHA-256 of
its bytes), so :class:`nca_kit.cache.Cache` verifies it on every read exactly as it verifies its own entries; a
shipped entry that does not verify is ignored with a warning and recomputed. ``data/cache/MANIFEST.json`` lists each
file with its size, digest and the notebook that wrote it.

Nothing here changes a result: a notebook run with ``NCA_KIT_SHIPPED_CACHE=0`` computes the same entries (the same
settings, so the same keys) and gives the same outputs, only slower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "cache"
MANIFEST = "MANIFEST.json"
NOT_SHIPPED = ("models", "arith_")  # model copies (weights are never committed), generated datasets (data/ has them)
MAX_ENTRY_BYTES = 8 << 20
SIDECAR = ".settings.json"


def entries(folder: Path) -> dict[str, Path]:
    """Complete cache entries in ``folder`` (a file with its sidecar), by file name."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.endswith(SIDECAR) and not p.name.startswith(".")
            and p.with_name(p.name + SIDECAR).is_file()}


def shippable(path: Path) -> str | None:
    """Why ``path`` is not shipped, or ``None``."""
    if path.name.startswith(NOT_SHIPPED):
        return "not a computed result (model copy or generated dataset)"
    if path.stat().st_size > MAX_ENTRY_BYTES:
        return f"{path.stat().st_size / 2**20:.1f} MiB, over the {MAX_ENTRY_BYTES >> 20} MiB limit"
    return None


def ship(found: dict[str, tuple[Path, str]], target: Path = SHIPPED, replace_notebooks: set[str] | None = None) -> dict:
    """Copy ``{file name: (path, notebook)}`` with their sidecars into ``target`` and rewrite its manifest. Entries of
    notebooks in ``replace_notebooks`` (all, when ``None``) that are not in ``found`` are removed."""
    from nca_kit.cache import file_digest

    target.mkdir(parents=True, exist_ok=True)
    manifest_path = target / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"entries": {}}
    kept = {name: row for name, row in manifest["entries"].items()
            if replace_notebooks is not None and row["notebook"] not in replace_notebooks and name not in found}
    for name in set(manifest["entries"]) - set(kept) - set(found):
        for stale in (target / name, target / (name + SIDECAR)):
            stale.unlink(missing_ok=True)
    for name, (path, notebook) in sorted(found.items()):
        shutil.copyfile(path, target / name)
        shutil.copyfile(path.with_name(name + SIDECAR), target / (name + SIDECAR))
        kept[name] = {"notebook": notebook, "bytes": path.stat().st_size, "sha256": file_digest(target / name)}
    manifest = {"about": "Cache entries shipped with the kit; written by scripts/build_shipped_cache.py, read by "
                         "nca_kit.cache.Cache (verified on every read). Do not edit by hand.",
                "command": "python scripts/build_shipped_cache.py", "entries": dict(sorted(kept.items()))}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check(target: Path = SHIPPED) -> list[str]:
    """Problems of the shipped folder: files not in the manifest, listed files missing, digests that differ,
    sidecars whose recorded digest disagrees."""
    from nca_kit.cache import file_digest

    manifest_path = target / MANIFEST
    if not manifest_path.exists():
        return [f"{manifest_path} is missing"]
    listed = json.loads(manifest_path.read_text())["entries"]
    present = entries(target)
    problems = [f"{name}: not in the manifest" for name in sorted(set(present) - set(listed))]
    for name, row in listed.items():
        path = target / name
        if name not in present:
            problems.append(f"{name}: listed but missing (or its sidecar is)")
            continue
        digest = file_digest(path)
        sidecar = json.loads(path.with_name(name + SIDECAR).read_text())
        if digest != row["sha256"]:
            problems.append(f"{name}: content differs from the manifest's digest")
        if digest != sidecar.get("sha256"):
            problems.append(f"{name}: content differs from its sidecar's digest")
    return problems


def build(notebooks: list[str], work: Path, timeout: int) -> dict[str, tuple[Path, str]]:
    """Run each notebook cold in full size into ``work``; the new cache entries after each, by the notebook."""
    cache = work / "cache"
    env = dict(os.environ, NCA_KIT_CACHE=str(cache), NCA_KIT_SHIPPED_CACHE="0")
    env.pop("NCA_KIT_SMOKE", None)
    found: dict[str, tuple[Path, str]] = {}
    for notebook in notebooks:
        before = set(entries(cache))
        started = time.monotonic()
        command = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), notebook, "--out", str(work / "out"),
                   "--timeout", str(timeout)]
        result = subprocess.run(command, env=env, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"notebook {notebook} failed (exit {result.returncode}); nothing shipped")
        new = {name: path for name, path in entries(cache).items() if name not in before}
        for name, path in new.items():
            why = shippable(path)
            if why:
                print(f"  not shipped: {name} ({why})")
            else:
                found[name] = (path, notebook)
        print(f"{notebook}: {len(new)} new cache entries in {time.monotonic() - started:.0f} s")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("notebooks", nargs="*", help="notebooks by number (default: every CPU course notebook)")
    parser.add_argument("--check", action="store_true", help="verify data/cache against its manifest and exit")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.check:
        problems = check()
        print("\n".join(problems) if problems else f"{SHIPPED}: every entry matches the manifest")
        return 1 if problems else 0
    notebooks = args.notebooks or sorted(p.name.split("_")[0] for p in (REPO / "notebooks").glob("[0-9]*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="nca-kit-ship-") as tmp:
        work = args.work or Path(tmp)
        found = build(notebooks, work, args.timeout)
        manifest = ship(found, replace_notebooks=None if not args.notebooks else set(notebooks))
    total = sum(row["bytes"] for row in manifest["entries"].values())
    print(f"{SHIPPED}: {len(manifest['entries'])} entries, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
