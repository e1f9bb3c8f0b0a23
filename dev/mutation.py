"""Mutation testing of vlablocks with mutmut: ``make mutation`` (slow; not part of ``make test`` or CI).

mutmut copies the source tree into ``mutants/`` and imports the package from there. This
repository maps ``blocks/``, ``encoders/``, ``heads/`` and ``recipes/`` into the ``vlablocks``
package (pyproject's ``package-dir``), which such a copy cannot follow, and mutating files in
place would put the working tree at risk. So every area runs in its own staged copy,
``build/mutation/<area>/``, laid out as an ordinary package (``vlablocks/blocks/...``) with the
tests beside it; mutmut's cache there makes the next run re-test only the functions that changed.

Each area mutates its modules and runs its own test files (:data:`AREAS`); mutmut runs, for each
mutant, only the tests that call the mutated function. A mutant is *killed* when a test fails (or
hangs: a timeout). Each module runs a seeded sample of its mutants (``--sample``). Survivors are
sorted into:

- *message*: the change only touches the text of an error, warning or help message or a
  docstring, or the arguments of a logging call (found from the module's syntax tree).
  Observable, but not behaviour; counted apart.
- *equivalent*: listed with a reason in ``dev/mutation_equivalent.yaml`` (no observable difference).
- *open*: a gap in the tests.

The kill rate is (killed + timeout) / (run - message - equivalent - skipped); mutants that no
selected test reaches ("no tests") count as not killed, sampled mutants not yet run are left out
(and counted in the report).

Run:
    make mutation                                                    # every area
    make mutation MUTATION_ARGS="--area policy"                      # one area
    make mutation MUTATION_ARGS="--area policy --module vlablocks/policy/normalize.py"
    make mutation MUTATION_ARGS="--retest"                           # the open survivors again, after new tests
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tokenize
import tomllib
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from vlablocks.io.atomic import replace_section, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("mutation")


@dataclass(frozen=True)
class Area:
    """Modules (repository paths, globs) mutated together, and the test files run against them."""

    modules: tuple[str, ...]
    tests: tuple[str, ...]
    #: tests left out (each with its reason where it is listed)
    deselect: tuple[str, ...] = ()


#: the areas of the report. Tests are chosen per area (the fast unit tests of those modules and the
#: policy-level tests that exercise them): a test outside the selection could kill more, so the rates
#: are lower bounds.
AREAS: dict[str, Area] = {
    "blocks": Area(("blocks/*.py",), (
        "tests/test_layers.py", "tests/test_masks.py", "tests/test_fusion.py", "tests/test_dit.py",
        "tests/test_deep_fusion_denoiser.py", "tests/test_inference.py", "tests/test_precision.py",
        "tests/test_lerobot_policies.py"), (
        # counts graph breaks: mutmut's dispatch into each mutated function is one
        "tests/test_inference.py::test_fused_int8_step_and_prefix_trace_as_one_graph",)),
    "encoders": Area(("encoders/*.py",), (
        "tests/test_vision.py", "tests/test_text.py", "tests/test_geometry.py", "tests/test_time_embedding.py",
        "tests/test_suffix.py", "tests/test_augment.py", "tests/test_lerobot_policies.py")),
    "heads": Area(("heads/*.py",), (
        "tests/test_flow_matching.py", "tests/test_deep_fusion_denoiser.py", "tests/test_dit.py",
        "tests/test_strategies.py", "tests/test_lerobot_policies.py")),
    "policy": Area(("vlablocks/policy/*.py",), (
        "tests/test_normalize.py", "tests/test_batch_checks.py", "tests/test_domain_checks.py",
        "tests/test_inference.py", "tests/test_precision.py", "tests/test_policy_structure.py",
        "tests/test_augment.py", "tests/test_lerobot_policies.py", "tests/test_lerobot_smolvla.py",
        "tests/test_pretrained.py", "tests/test_policy_contracts.py")),
    "train": Area(("vlablocks/train/*.py",), (
        "tests/test_trainer.py", "tests/test_checkpoint.py", "tests/test_numerics.py", "tests/test_divergence.py",
        "tests/test_finetune.py", "tests/test_policy_structure.py", "tests/test_train_contracts.py",
        "tests/test_workflow.py", "tests/test_cli_errors.py", "tests/test_user_files.py", "tests/test_lerobot_export.py"), (
        # these run the code in a subprocess, which imports the unmutated package
        "tests/test_trainer.py::test_ddp_gradients_match_single_process",
        "tests/test_checkpoint.py::test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_intact",
        "tests/test_checkpoint.py::test_sigterm_writes_a_checkpoint_and_resume_loses_no_step")),
    "data": Area(("vlablocks/data/*.py",), (
        "tests/test_dataset.py", "tests/test_dataset_formats.py", "tests/test_video.py",
        "tests/test_lerobot_fixtures.py", "tests/test_lerobot_export.py", "tests/test_user_files.py",
        "tests/test_data_contracts.py")),
}

EQUIVALENT = ROOT / "dev" / "mutation_equivalent.yaml"
#: logging calls: any change to their arguments only changes what is logged.
LOG_CALLS = {"debug", "info", "warning", "error", "exception", "critical"}
#: calls whose string arguments are messages (``warnings.warn(...)``, ``pytest.fail``, exceptions).
MESSAGE_CALLS = {"warn", "fail", "SystemExit", "check_shape"}  # check_shape: a name and a layout for its error
MESSAGE_KEYWORDS = {"help", "description", "epilog", "metavar", "desc"}


def package_map(pyproject: Path) -> dict[str, str]:
    """Repository directory -> staged directory, from pyproject's ``package-dir``
    (``blocks`` -> ``vlablocks/blocks``)."""
    package_dir = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {source: package.replace(".", "/") for package, source in package_dir.items()}


def staged_path(path: str, mapping: dict[str, str]) -> str:
    """``blocks/attention.py`` -> ``vlablocks/blocks/attention.py`` (the path mutmut names)."""
    head, _, rest = path.partition("/")
    return f"{mapping[head]}/{rest}" if head in mapping else path


def repository_path(path: str, mapping: dict[str, str]) -> str:
    """The inverse of :func:`staged_path`."""
    for source, staged in sorted(mapping.items(), key=lambda item: -len(item[1])):
        if path.startswith(staged + "/") and source != staged:
            return f"{source}/{path[len(staged) + 1:]}"
    return path


def _sync_tree(source: Path, target: Path, exclude: frozenset[str] = frozenset()) -> None:
    """Copy ``source`` over ``target`` (only files whose content differs, keeping their times so
    that mutmut sees unchanged files as unchanged); drop target files that the source lacks.
    Top-level names in ``exclude`` are left alone on both sides."""
    def skipped(relative: Path) -> bool:
        return "__pycache__" in relative.parts or relative.parts[0] in exclude

    wanted = set()
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if skipped(relative):
            continue
        wanted.add(relative)
        destination = target / relative
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif not destination.exists() or not filecmp.cmp(path, destination, shallow=False):
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    for path in sorted(target.rglob("*"), reverse=True):
        relative = path.relative_to(target)
        if relative not in wanted and not skipped(relative):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def stage(area: str, modules: list[str], work: Path) -> Path:
    """Lay out ``work/<area>`` (package, tests, mutmut configuration); returns it."""
    directory = work / area
    mapping = package_map(ROOT / "pyproject.toml")
    for source, staged in mapping.items():  # vlablocks/ holds the mapped packages, synced from their own folders
        nested = frozenset(Path(other).name for other in mapping.values() if other.startswith(staged + "/"))
        _sync_tree(ROOT / source, directory / staged, exclude=nested)
    for shared in ("tests", "docs"):
        _sync_tree(ROOT / shared, directory / shared)
    only_mutate = [staged_path(m, mapping) for m in modules]
    config_file = directory / "pyproject.toml"
    if config_file.exists() and tomllib.loads(config_file.read_text())["tool"]["mutmut"]["only_mutate"] != only_mutate:
        shutil.rmtree(directory / "mutants", ignore_errors=True)  # mutmut would keep files it copied unmutated before
    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    config = {
        "source_paths": ["vlablocks"],
        "only_mutate": only_mutate,
        "pytest_add_cli_args_test_selection": [*AREAS[area].tests,
                                               *(arg for test in AREAS[area].deselect for arg in ("--deselect", test))],
        "also_copy": ["docs"],  # tests read docs/ (accelerate configs, documented figures)
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "use_git_change_detection": False,
        "process_isolation": "forkserver",  # forking the process that ran tests can deadlock torch's thread pool
    }
    text = _toml({"tool.mutmut": config, "tool.pytest.ini_options": pytest_options})
    if not config_file.exists() or config_file.read_text() != text:
        write_text(config_file, text)
    return directory


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    """The few TOML values used here (strings, numbers, booleans, lists of strings)."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def run_mutmut(directory: Path, names: list[str], log_file: Path, max_children: int) -> int:
    """``mutmut run NAMES`` in ``directory`` (it first generates the mutants and, once, records which
    tests call which function); its terminal display goes to ``log_file``."""
    mutmut = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread per mutant, mutants side by side
    with open(log_file, "a") as out:
        return subprocess.call([str(mutmut), "run", "--max-children", str(max_children), *names], cwd=directory,
                               env=env, stdout=out, stderr=subprocess.STDOUT)


def generated(directory: Path) -> dict[str, dict[str, int | None]]:
    """Every generated mutant's exit code (None: not run yet), by staged module path, from
    mutmut's ``.meta`` files."""
    mutants = directory / "mutants"
    return {str(meta.relative_to(mutants))[: -len(".meta")]: json.loads(meta.read_text())["exit_code_by_key"]
            for meta in sorted(mutants.rglob("*.py.meta"))}


def sample(names: list[str], fraction: float, minimum: int, seed: int) -> list[str]:
    """A seeded sample of one module's mutants: ``max(minimum, fraction * n)`` of them (all for
    ``fraction >= 1``), in their original order."""
    count = len(names) if fraction >= 1 else min(len(names), max(minimum, round(fraction * len(names))))
    chosen = set(random.Random(f"{seed}:{len(names)}:{names[:1]}").sample(names, count))
    return [name for name in names if name in chosen]


def to_run(chosen: dict[str, list[str]], codes: dict[str, dict[str, int | None]], retest: bool,
           settled: set[str]) -> list[str]:
    """The sampled mutants to run: those without a result and, with ``retest``, those that
    survived or that no test reached, unless ``settled`` (message-only or equivalent: no test
    can or need kill them)."""
    again = {0, 5, 33} if retest else set()  # mutmut's exit codes: survived, no tests (pytest's 5, mutmut's 33)
    return [name for path, names in chosen.items() for name in names
            if codes[path][name] is None or (codes[path][name] in again and name not in settled)]


def run_area(area: str, modules: list[str], args: argparse.Namespace, settled: set[str]) -> bool:
    """Stage ``area``, generate its mutants, sample them and run the sampled ones that have no
    result yet (and, with ``--retest``, the open survivors: not those in ``settled``); False if
    mutmut failed."""
    directory = stage(area, modules, args.work)
    log_file = directory / "mutmut.log"
    log_file.unlink(missing_ok=True)
    log.info("%s: generating mutants and recording which tests reach them (display in %s)", area, log_file)
    run_mutmut(directory, ["vlablocks.no-such-mutant"], log_file, args.max_children)  # generates and records, runs none
    if not (directory / "mutants" / "mutmut-stats.json").exists():
        log.error("%s: mutmut could not record the tests (a selected test fails?); see %s", area, log_file)
        return False
    codes = generated(directory)
    chosen = {path: sample(sorted(by_name), args.sample, args.sample_min, args.seed) for path, by_name in codes.items()}
    write_json(directory / "sample.json", {"settings": {"fraction": args.sample, "minimum": args.sample_min, "seed": args.seed},
                                           "mutants": chosen})
    todo = to_run(chosen, codes, args.retest, settled)
    log.info("%s: %d mutants generated, %d sampled, %d to run", area, sum(map(len, codes.values())),
             sum(map(len, chosen.values())), len(todo))
    if todo and run_mutmut(directory, todo, log_file, args.max_children) != 0:
        log.error("%s: mutmut failed; see %s", area, log_file)
        return False
    return True


# --- classification ------------------------------------------------------------------------------

def _tokens(line: str) -> list[tuple[int, str]] | None:
    """The tokens of one source line, which may be a fragment of a longer statement (unbalanced
    brackets are balanced first); None if it does not tokenize."""
    for opening in range(4):
        for closing in range(4):
            text = "(" * opening + line.strip() + ")" * closing + "\n"
            try:
                tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
            except (tokenize.TokenError, IndentationError, SyntaxError):
                continue
            return [(t.type, t.string) for t in tokens if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    return None


def text_only(before: str, after: str) -> bool:
    """Whether two source lines differ only in the literal text of strings: mutmut's string
    mutants wrap a string's text in ``XX`` or change its case (a change inside an f-string's
    expression is not a text change)."""
    a, b = _tokens(before), _tokens(after)
    if a is None or b is None or len(a) != len(b) or a == b:
        return False
    return all(x == y or (x[0] == y[0] == tokenize.STRING and y[1].replace("XX", "").lower() == x[1].lower())
               for x, y in zip(a, b))


def message_lines(source: str) -> tuple[set[int], set[int]]:
    """Line numbers of ``source`` that hold message text (raise statements, warnings, exception
    constructors, ``help=``-like keywords, docstrings), and those of logging calls."""
    text: set[int] = set()
    logging_: set[int] = set()

    def span(node: ast.AST, into: set[int]) -> None:
        into.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            span(node, text)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in LOG_CALLS and isinstance(node.func, ast.Attribute):
                span(node, logging_)
            elif name in MESSAGE_CALLS or name.endswith(("Error", "Exception", "Warning")):
                span(node, text)
            for keyword in node.keywords:
                if keyword.arg in MESSAGE_KEYWORDS:
                    span(keyword.value, text)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                span(body[0], text)
    return text, logging_


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    """The removed and added lines of a unified diff."""
    body = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@"))]
    return [line[1:] for line in body if line.startswith("-")], [line[1:] for line in body if line.startswith("+")]


def is_message(diff: str, source: str) -> bool:
    """Whether a mutant (its diff against ``source``, the module's text) only changes message
    text, or the arguments of a logging call."""
    removed, added = changed_lines(diff)
    if not removed or len(removed) != len(added):
        return False
    lines = source.splitlines()
    text, logging_ = message_lines(source)

    def within(old: str, spans: set[int]) -> bool:
        return any(number + 1 in spans for number, line in enumerate(lines) if line.strip() == old.strip())

    return all(within(old, logging_) or (text_only(old, new) and within(old, text)) for old, new in zip(removed, added))


# --- results -------------------------------------------------------------------------------------

def collect(out: Path) -> None:
    """Run inside a staged area (mutmut reads its configuration from the working directory):
    every mutant's status, and for each one not killed its diff and message classification."""
    from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files  # noqa: PLC0415 (mutmut: optional)
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # noqa: PLC0415
    from mutmut.stats import status_by_exit_code  # noqa: PLC0415

    chosen = {name for names in json.loads(Path("sample.json").read_text())["mutants"].values() for name in names}
    mutants = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        source = Path(path).read_text()
        for name, code in data.exit_code_by_key.items():
            if name not in chosen:
                continue
            status = status_by_exit_code[code]
            row: dict[str, Any] = {"name": name, "module": str(path), "status": status}
            if status != "killed":
                diff = get_diff_for_mutant(name, path=path)
                row |= {"diff": diff, "message": is_message(diff, source)}
            mutants.append(row)
    write_json(out, mutants)


def summarise(mutants: list[dict[str, Any]], equivalent: dict[str, str], mapping: dict[str, str]) -> list[dict[str, Any]]:
    """Per module: counts by outcome and the kill rate."""
    modules: dict[str, dict[str, Any]] = {}
    for mutant in mutants:
        row = modules.setdefault(repository_path(mutant["module"], mapping), dict.fromkeys(
            ("mutants", "killed", "open", "message", "equivalent", "no tests", "timeout", "skipped", "not run", "other"), 0))
        row["mutants"] += 1
        status = mutant["status"]
        if status == "killed":
            row["killed"] += 1
        elif status in ("timeout", "segfault"):  # a hang or crash is a failure a user would see
            row["timeout"] += 1
        elif status == "skipped":
            row["skipped"] += 1
        elif status == "not checked":  # sampled, but the run was stopped before it
            row["not run"] += 1
        elif mutant["name"] in equivalent:
            row["equivalent"] += 1
        elif mutant.get("message"):
            row["message"] += 1
        elif status == "no tests":
            row["no tests"] += 1
        elif status == "survived":
            row["open"] += 1
        else:
            row["other"] += 1
    for row in modules.values():
        counted = row["mutants"] - row["message"] - row["equivalent"] - row["skipped"] - row["not run"]
        row["kill_rate"] = (row["killed"] + row["timeout"]) / counted if counted else 1.0
    return [{"module": name, **row} for name, row in sorted(modules.items())]


def markdown(areas: dict[str, list[dict[str, Any]]], mutants: dict[str, list[dict[str, Any]]],
             equivalent: dict[str, str], mapping: dict[str, str]) -> str:
    """The report: a table per area, then the open survivors (the line before and after)."""
    lines = ["| area / module | mutants run (of generated) | killed | open | message only | equivalent | no tests | "
             "timeout | kill rate |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for area, rows in areas.items():
        total = {key: sum(row[key] for row in rows) for key in rows[0] if key not in ("module", "kill_rate")}
        counted = total["mutants"] - total["message"] - total["equivalent"] - total["skipped"] - total["not run"]
        rate = (total["killed"] + total["timeout"]) / counted if counted else 1.0
        if total["not run"]:
            area = f"{area} ({total['not run']} sampled mutants not run)"
        lines.append(f"| **{area}** | **{total['mutants']}** ({total['generated']}) | **{total['killed']}** | "
                     f"**{total['open']}** | {total['message']} | {total['equivalent']} | {total['no tests']} | "
                     f"{total['timeout']} | **{rate:.1%}** |")
        lines += [f"| `{row['module']}` | {row['mutants']} ({row['generated']}) | {row['killed']} | {row['open']} | "
                  f"{row['message']} | {row['equivalent']} | {row['no tests']} | {row['timeout']} | {row['kill_rate']:.1%} |"
                  for row in rows]
    lines += ["", "Open survivors and mutants no selected test reaches (the changed line, before -> after):", ""]
    for area, rows in mutants.items():
        open_ = [m for m in rows if m["status"] in ("survived", "no tests") and not m.get("message")
                 and m["name"] not in equivalent]
        if not open_:
            continue
        lines += [f"<details><summary>{area}: {len(open_)}</summary>", ""]
        for mutant in open_:
            removed, added = changed_lines(mutant["diff"])
            change = "; ".join(f"`{a.strip()}` -> `{b.strip()}`" for a, b in zip(removed, added)) or "(lines removed)"
            short = mutant["name"].split(".")[-1]
            tag = " (no tests)" if mutant["status"] == "no tests" else ""
            lines.append(f"- `{repository_path(mutant['module'], mapping)}` {short}{tag}: {change}")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--area", nargs="+", choices=list(AREAS), default=list(AREAS))
    parser.add_argument("--module", nargs="+", default=None, metavar="PATH",
                        help="repository paths to mutate (e.g. blocks/attention.py, vlablocks/policy/normalize.py); "
                             "default: every module of the areas")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "mutation")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "mutation" / "mutation.json")
    parser.add_argument("--update", type=Path, default=ROOT / "docs" / "mutation.md",
                        help="markdown file with a <!-- mutation:begin/end --> section")
    parser.add_argument("--sample", type=float, default=0.1, metavar="FRACTION",
                        help="fraction of each module's mutants to run (seeded; 1 runs them all)")
    parser.add_argument("--sample-min", type=int, default=20, help="at least this many per module (or all it has)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retest", action="store_true",
                        help="run the sampled open survivors again (after adding tests); message-only and equivalent ones are not")
    parser.add_argument("--report-only", action="store_true", help="re-read the staged results; run nothing")
    parser.add_argument("--collect", type=Path, help=argparse.SUPPRESS)  # inside a staged area (see collect)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.collect:
        collect(args.collect)
        return 0
    mapping = package_map(ROOT / "pyproject.toml")
    equivalent = yaml.safe_load(EQUIVALENT.read_text()) or {} if EQUIVALENT.exists() else {}
    previous = json.loads(args.json.read_text()) if args.json.exists() else {"areas": {}}
    results: dict[str, Any] = previous.get("areas", {})
    failed: list[str] = []
    if not args.update.is_file():
        parser.error(f"--update: {args.update} does not exist; expected a markdown file with a "
                     "<!-- mutation:begin --> ... <!-- mutation:end --> section")
    unknown = [m for m in args.module or () if not any(_in_area(m, area, mapping) for area in AREAS)]
    if unknown:
        parser.error(f"--module: {unknown} belong to no area; expected paths like blocks/attention.py or "
                     "vlablocks/train/ema.py")
    for area in args.area:
        modules = [m for m in (args.module or AREAS[area].modules) if _in_area(m, area, mapping)]
        if not modules:
            continue
        directory = args.work / area
        if args.report_only and not (directory / "sample.json").exists():
            log.warning("%s: no results in %s yet; run it first", area, directory)
            continue
        settled = {m["name"] for m in results.get(area, {}).get("survivors", [])
                   if m.get("message") or m["name"] in equivalent}  # as the last report sorted them
        if not args.report_only and not run_area(area, modules, args, settled):
            failed.append(area)
            continue
        subprocess.check_call([sys.executable, __file__, "--collect", "results.json"], cwd=directory)
        mutants = json.loads((directory / "results.json").read_text())
        counts = {repository_path(path, mapping): len(names) for path, names in generated(directory).items()}
        rows = [{**row, "generated": counts.get(row["module"], row["mutants"])}
                for row in summarise(mutants, equivalent, mapping)]
        results[area] = {"modules": rows, "tests": list(AREAS[area].tests), "deselected": list(AREAS[area].deselect),
                         "sample": json.loads((directory / "sample.json").read_text())["settings"],
                         "survivors": [m for m in mutants if m["status"] != "killed"]}
        log.info("%s: %d mutants, %d killed", area, len(mutants), sum(m["status"] == "killed" for m in mutants))
    stale = sorted(set(equivalent) - {m["name"] for r in results.values() for m in r["survivors"]})
    ordered = {area: results[area] for area in AREAS if area in results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, {"command": "make mutation", "mutmut": version("mutmut"), "areas": ordered,
                           "stale_equivalent": stale})
    report = markdown({a: r["modules"] for a, r in ordered.items()}, {a: r["survivors"] for a, r in ordered.items()},
                      equivalent, mapping)
    replace_section(args.update, "mutation", report)
    log.info("report: %s, %s%s", args.update, args.json, f"; stale equivalent entries: {stale}" if stale else "")
    if failed:
        log.error("mutmut failed in %s (their previous results, if any, are kept)", ", ".join(failed))
    return 1 if failed else 0


def _in_area(module: str, area: str, mapping: dict[str, str]) -> bool:
    staged = staged_path(module, mapping)
    return any(Path(staged).match(staged_path(pattern, mapping)) for pattern in AREAS[area].modules)


if __name__ == "__main__":
    raise SystemExit(main())
