"""dev/mutation.py's own logic (``make mutation``): the staged layout's paths, which surviving
mutants count as message text, and the per-module summary. mutmut itself is not needed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "dev" / "mutation.py")
mutation = sys.modules.setdefault("mutation_tool", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(mutation)

SOURCE = '''\
def f(x):
    """Docstring."""
    if x < 0:
        raise ValueError(
            f"x must be >= 0; got {x}, "
            "which is negative")
    logger.info("value %s", x)
    table = {"mean": 1, "std": 2}
    check_shape("points", x, (2, 3), "[B, 3]")
    return table["mean"] + x
'''


def test_paths_map_between_the_repository_and_the_staged_package():
    mapping = mutation.package_map(ROOT / "pyproject.toml")
    assert mapping["blocks"] == "vlablocks/blocks" and mapping["vlablocks"] == "vlablocks"
    assert mutation.staged_path("blocks/attention.py", mapping) == "vlablocks/blocks/attention.py"
    assert mutation.staged_path("vlablocks/policy/vla.py", mapping) == "vlablocks/policy/vla.py"
    for path in ("blocks/attention.py", "vlablocks/policy/vla.py", "recipes/builder.py"):
        assert mutation.repository_path(mutation.staged_path(path, mapping), mapping) == path
    assert mutation._in_area("blocks/attention.py", "blocks", mapping)
    assert not mutation._in_area("vlablocks/policy/vla.py", "blocks", mapping)


@pytest.mark.parametrize(("before", "after", "expected"), [
    ('    "which is negative")', '    "XXwhich is negativeXX")', True),  # a fragment of a longer statement
    ('logger.info("value %s", x)', 'logger.info("VALUE %S", x)', True),
    ('f"x must be >= 0; got {x}, "', 'f"x must be >= 0; got {None}, "', False),  # an f-string's expression
    ('raise ValueError(f"x {x}")', "raise ValueError(None)", False),
    ("if x < 0:", "if x <= 0:", False),
    ('return table["mean"] + x', 'return table["mean"] + x', False),  # no change
])
def test_text_only_accepts_only_mutmuts_string_text_mutations(before, after, expected):
    assert mutation.text_only(before, after) is expected


def _diff(before: str, after: str) -> str:
    return f"--- a.py\n+++ a.py\n@@ -1,3 +1,3 @@\n def f(x):\n-{before}\n+{after}\n"


def test_message_mutants_are_text_changes_inside_raises_and_docstrings_or_any_change_to_a_log_call():
    text, logging_ = mutation.message_lines(SOURCE)
    assert {2, 4, 5, 6, 9} <= text and logging_ == {7} and not {3, 8, 10} & (text | logging_)
    assert mutation.is_message(_diff('            "which is negative")', '            "XXwhich is negativeXX")'), SOURCE)
    assert mutation.is_message(_diff('    logger.info("value %s", x)', '    logger.info("XXvalue %sXX", x)'), SOURCE)
    assert mutation.is_message(_diff('    logger.info("value %s", x)', '    logger.info(None, x)'), SOURCE)  # what is logged
    # the same kind of change to a dict key is behaviour, and so is a changed condition inside the function
    assert not mutation.is_message(_diff('    table = {"mean": 1, "std": 2}', '    table = {"XXmeanXX": 1, "std": 2}'), SOURCE)
    assert not mutation.is_message(_diff("    if x < 0:", "    if x <= 0:"), SOURCE)
    # check_shape's name and layout only appear in its error; the shape it checks is behaviour
    assert mutation.is_message(_diff('    check_shape("points", x, (2, 3), "[B, 3]")', '    check_shape("points", x, (2, 3), "[b, 3]")'), SOURCE)
    assert not mutation.is_message(_diff('    check_shape("points", x, (2, 3), "[B, 3]")', '    check_shape("points", x, (2, 4), "[B, 3]")'), SOURCE)


def test_summary_counts_each_outcome_and_the_kill_rate_leaves_out_message_and_equivalent_survivors():
    mapping = {"vlablocks": "vlablocks", "blocks": "vlablocks/blocks"}
    module = "vlablocks/blocks/a.py"
    mutants = [{"name": f"m{i}", "module": module, "status": "killed"} for i in range(6)]
    mutants += [{"name": "s1", "module": module, "status": "survived", "message": True},
                {"name": "s2", "module": module, "status": "survived", "message": False},
                {"name": "s3", "module": module, "status": "survived", "message": False},
                {"name": "n1", "module": module, "status": "no tests", "message": False},
                {"name": "t1", "module": module, "status": "timeout"},
                {"name": "r1", "module": module, "status": "not checked"}]
    [row] = mutation.summarise(mutants, {"s3": "same program"}, mapping)
    assert row["module"] == "blocks/a.py"
    assert {k: row[k] for k in ("mutants", "killed", "open", "message", "equivalent", "no tests", "timeout")} == {
        "mutants": 12, "killed": 6, "open": 1, "message": 1, "equivalent": 1, "no tests": 1, "timeout": 1}
    assert row["not run"] == 1
    assert row["kill_rate"] == pytest.approx(7 / 9)  # (killed + timeout) / (12 - message - equivalent - not run)


def test_sample_is_seeded_proportional_with_a_floor_and_keeps_the_order():
    names = [f"m.x_f__mutmut_{i}" for i in range(1, 301)]
    chosen = mutation.sample(names, 0.1, 20, seed=0)
    assert len(chosen) == 30 and chosen == sorted(chosen, key=names.index)
    assert mutation.sample(names, 0.1, 20, seed=0) == chosen and mutation.sample(names, 0.1, 20, seed=1) != chosen
    assert len(mutation.sample(names[:50], 0.1, 20, seed=0)) == 20  # the floor
    assert mutation.sample(names[:12], 0.1, 20, seed=0) == names[:12]  # a small module runs whole
    assert mutation.sample(names, 1.0, 20, seed=0) == names


def test_a_retest_runs_the_open_survivors_and_what_never_ran_but_not_settled_or_killed_mutants():
    chosen = {"m.py": ["a", "b", "c", "d", "e", "f"]}
    codes = {"m.py": {"a": None, "b": 0, "c": 1, "d": 33, "e": 0, "f": 5}}  # never run, survived, killed, no tests
    assert mutation.to_run(chosen, codes, retest=False, settled={"e"}) == ["a"]
    assert mutation.to_run(chosen, codes, retest=True, settled={"e"}) == ["a", "b", "d", "f"]
