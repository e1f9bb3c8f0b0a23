"""Before/after benchmark of the restructure: the code at ``--old`` (default 7df7761) against the
working tree (or ``--new REV``), timed side by side in one run.

    python benchmarks/restructure.py                                # prints the table (~1 min on 2 cores)
    python benchmarks/restructure.py --write docs/benchmarks.md     # and replaces its restructure section

Each side is exported (``git archive REV``, which touches no git state; the working tree is
copied as it is on disk) into a temporary importable tree: the repository's folders placed as
``pyproject.toml`` maps them (``blocks/`` -> ``vlablocks/blocks/`` ...). Each side is then timed
by fresh processes of ``benchmarks/restructure_child.py`` with ``PYTHONPATH`` at its tree (the
child takes the editable install's import hook out of the way and checks where every
``vlablocks`` module came from), torch threads fixed, old and new processes alternating
(ABAB) so that a slow spell of a shared machine hits both sides alike. A figure is the median
of all its samples of one side; ``noise`` is half the range of the per-process medians, relative
to the side's median (the larger of the two sides): a speed-up inside it is no measured change.
The child also returns the velocity's sum and the loss, which agree between the sides when
both compute the same thing from the same seeded weights and inputs. Needs Python >= 3.11
(``tomllib``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlablocks.io.atomic import replace_section
from vlablocks.tools.bench import machine_description

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().with_name("restructure_child.py")
SECTION = "restructure"
DEFAULT_OLD = "7df7761"
#: the child's figures and their labels in the table
FIGURES = {
    "denoise_step_ms": "`tiny_smolvla` denoise step (`velocity`, batch 1)",
    "train_forward_ms": "`tiny_pi05` training forward (loss, batch 8)",
    "train_forward_backward_ms": "`tiny_pi05` training forward + backward (batch 8)",
}


@dataclass(frozen=True)
class ChildSettings:
    """What each timing child is told (see ``benchmarks/restructure_child.py``)."""

    repeats: int = 20
    warmup: int = 3
    inner: int = 10
    threads: int = 1
    seed: int = 0

    def argv(self) -> list[str]:
        return [f"--repeats={self.repeats}", f"--warmup={self.warmup}", f"--inner={self.inner}",
                f"--threads={self.threads}", f"--seed={self.seed}"]


# ------------------------------------------------------------------------------------ the trees


def package_dirs(pyproject: str) -> dict[str, str]:
    """``[tool.setuptools] package-dir`` of a ``pyproject.toml``: package -> repository folder."""
    return tomllib.loads(pyproject)["tool"]["setuptools"]["package-dir"]


def importable_tree(source: Path, dirs: dict[str, str], dest: Path) -> Path:
    """Copy the folders of ``source`` into ``dest`` as the packages ``dirs`` maps them to
    (``vlablocks.blocks`` -> ``dest/vlablocks/blocks``), leaving compiled files behind."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in sorted(dirs, key=len):  # vlablocks before vlablocks.blocks
        shutil.copytree(source / dirs[package], dest.joinpath(*package.split(".")), ignore=ignore, dirs_exist_ok=True)
    return dest


def tree_at(repo: Path, rev: str | None, dest: Path) -> Path:
    """The importable tree of ``rev`` (``git archive``), or of the working tree for ``None``."""
    if rev is None:
        return importable_tree(repo, package_dirs((repo / "pyproject.toml").read_text()), dest)
    dirs = package_dirs(git(repo, "show", f"{rev}:pyproject.toml").decode())
    source = dest.with_name(dest.name + "-src")
    source.mkdir()
    archive = git(repo, "archive", "--format=tar", rev, "--", *sorted(set(dirs.values())))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    return importable_tree(source, dirs, dest)


def git(repo: Path, *args: str) -> bytes:
    """The stdout of a read-only git command in ``repo``."""
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout


def describe_side(repo: Path, rev: str | None) -> str:
    """``7df7761`` or ``the working tree at 55a4fb7 (+ uncommitted changes)``."""
    if rev is not None:
        return f"`{git(repo, 'rev-parse', '--short', rev).decode().strip()}`"
    head = git(repo, "rev-parse", "--short", "HEAD").decode().strip()
    folders = sorted(set(package_dirs((repo / "pyproject.toml").read_text()).values()))
    dirty = git(repo, "status", "--porcelain", "--", *folders).strip()  # what the copied tree holds
    return f"the working tree at `{head}`" + (" (+ uncommitted changes)" if dirty else "")


# ------------------------------------------------------------------------------------ timing


def run_child(tree: Path, settings: ChildSettings, out: Path | None = None) -> dict[str, Any]:
    """Time ``tree`` in a fresh process; RuntimeError if it fails or imports another tree."""
    out = out or tree.with_name(tree.name + ".json")
    out.unlink(missing_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    threads = str(settings.threads)
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    proc = subprocess.run([sys.executable, str(CHILD), f"--tree={tree}", f"--out={out}", *settings.argv()],
                          cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"timing child for {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text(encoding="utf-8"))
    if tree.resolve() not in Path(result["vlablocks_file"]).parents:
        raise RuntimeError(f"the child for {tree} imported {result['vlablocks_file']}")
    for name, samples in result["figures"].items():
        if not samples or min(samples) <= 0:
            raise RuntimeError(f"the child for {tree} measured no positive {name}: {samples}")
    return result


def compare(trees: dict[str, Path], rounds: int, settings: ChildSettings) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` children per side, the sides alternating (ABAB): each side's results."""
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in trees}
    for index in range(rounds):
        for side, tree in trees.items():
            result = run_child(tree, settings)
            results[side].append(result)
            medians = ", ".join(f"{name} {statistics.median(v):.2f}" for name, v in result["figures"].items())
            sys.stderr.write(f"round {index + 1}/{rounds} {side}: {medians} ({result['vlablocks_file']})\n")
    return results


# ------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Row:
    """One figure of both sides: medians in ms, and the noise (see the module docstring)."""

    figure: str
    old_ms: float
    new_ms: float
    noise: float | None  # None: one process per side, no spread to show

    @property
    def speedup(self) -> float:
        return self.old_ms / self.new_ms


def summarise(results: dict[str, list[dict[str, Any]]]) -> list[Row]:
    """Pool each side's samples per figure (``results`` keyed ``"old"`` and ``"new"``)."""
    rows = []
    for figure in FIGURES:
        medians, spreads = {}, []
        for side, runs in results.items():
            medians[side] = statistics.median(s for run in runs for s in run["figures"][figure])
            per_run = [statistics.median(run["figures"][figure]) for run in runs]
            spreads.append((max(per_run) - min(per_run)) / 2 / medians[side])
        rounds = min(len(runs) for runs in results.values())
        rows.append(Row(figure, medians["old"], medians["new"], max(spreads) if rounds > 1 else None))
    return rows


def outputs_agree(results: dict[str, list[dict[str, Any]]], rtol: float = 1e-5) -> bool:
    """Whether both sides computed the same velocity sum and loss (same weights, same inputs)."""
    old, new = results["old"][0]["checks"], results["new"][0]["checks"]
    return all(abs(old[key] - new[key]) <= rtol * max(abs(old[key]), 1e-12) for key in old)


def markdown(rows: list[Row], results: dict[str, list[dict[str, Any]]], sides: dict[str, str],
             settings: ChildSettings) -> str:
    """The table and a line saying what was measured where."""
    first = results["new"][0]
    machine = machine_description("cpu")
    rounds = len(results["new"])
    lines = [
        f"Old: {sides['old']} ({results['old'][0]['api']} API); new: {sides['new']} ({first['api']} API). "
        f"CPU ({machine['cpu']}), {first['threads']} torch thread(s), torch {first['torch']}; "
        f"{rounds} processes per side, alternating; each figure the median of {rounds} x {settings.repeats} samples "
        f"after {settings.warmup} warm-up calls (a denoise-step sample: the mean of {settings.inner} calls). "
        f"Outputs (velocity sum, loss) {'agree' if outputs_agree(results) else '**differ**'} between the sides.",
        "",
        "| figure | old (ms) | new (ms) | speed-up (old / new) | noise |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        noise = "-" if row.noise is None else f"+-{100 * row.noise:.0f} %"
        lines.append(f"| {FIGURES[row.figure]} | {row.old_ms:.2f} | {row.new_ms:.2f} | {row.speedup:.2f}x | {noise} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=DEFAULT_OLD, help=f"the revision before (default {DEFAULT_OLD})")
    parser.add_argument("--new", default=None, help="the revision after (default: the working tree as it is on disk)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the git repository (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="timing processes per side (default 3)")
    parser.add_argument("--repeats", type=int, default=ChildSettings.repeats, help="samples per figure and process")
    parser.add_argument("--warmup", type=int, default=ChildSettings.warmup, help="untimed calls first")
    parser.add_argument("--inner", type=int, default=ChildSettings.inner, help="denoise-step calls per sample")
    parser.add_argument("--threads", type=int, default=ChildSettings.threads, help="torch threads (default 1)")
    parser.add_argument("--write", type=Path, default=None,
                        help=f"replace the <!-- {SECTION}:begin/end --> section of this markdown file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.rounds, args.repeats, args.inner, args.threads) < 1 or args.warmup < 0:
        raise SystemExit("--rounds, --repeats, --inner and --threads must be >= 1, --warmup >= 0")
    settings = ChildSettings(args.repeats, args.warmup, args.inner, args.threads)
    sides = {"old": describe_side(args.repo, args.old), "new": describe_side(args.repo, args.new)}
    with tempfile.TemporaryDirectory(prefix="vlablocks-restructure-") as tmp:
        trees = {"old": tree_at(args.repo, args.old, Path(tmp) / "old"),
                 "new": tree_at(args.repo, args.new, Path(tmp) / "new")}
        results = compare(trees, args.rounds, settings)
    text = markdown(summarise(results), results, sides, settings)
    sys.stdout.write(text)
    if args.write is not None:
        replace_section(args.write, SECTION, text)
        sys.stdout.write(f"written to the {SECTION} section of {args.write}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
