"""Recipe fuzzing: mutated valid recipes either build or raise RecipeError with a key path.

Mutations of the resolved data of bundled tiny recipes: drop, rename, retype and duplicate
keys, wrong nesting, huge numbers, non-ASCII text and YAML tags (``!!python/object/apply``
among them, which must never construct anything). Every case is written to a file and goes
through the real loader and builder (on the meta device: tensor storage costs nothing, so what
is tested is that oversized integers are refused by the schema, not by the allocator).
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_recipe_errors import (  # one list of tags, shared with the tag tests
    MARKER,
    TAGS,
)
from vlablocks.recipes.builder import build
from vlablocks.recipes.loader import RecipeError, load_recipe

from vlablocks.policy.vla import VLA

BASES = ["tiny_pi0", "tiny_llava3d_deepfusion", "tiny_gr00t", "tiny_llava3d_dit_layerwise"]
BASE_DATA = {name: load_recipe(name).data for name in BASES}

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 2**31, 2**63, 10**30, 1e308, -1e308, 1e-320]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["ÿ", "注意力", "😀" * 3, "\u202e", "nan", "inf", "null", "~", "yes"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict / list (list items by index)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(paths(value, (*prefix, key)))
    return out


def parent_of(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


def mutate(data: dict, draw: Any) -> str:
    """Apply one drawn mutation to ``data`` (in place) and return the recipe's YAML text."""
    all_paths = paths(data)
    path = draw(st.sampled_from(all_paths))
    parent, key = parent_of(data, path), path[-1]
    op = draw(st.sampled_from(["drop", "rename", "retype", "nest", "unnest", "huge", "non_ascii", "tag", "duplicate"]))
    if op == "drop":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=10))] = parent.pop(key)
    elif op == "retype":
        parent[key] = draw(VALUES)
    elif op == "nest":
        parent[key] = {draw(st.sampled_from(["value", "type", "width", str(key)])): parent[key]}
    elif op == "unnest" and isinstance(parent[key], dict) and parent[key]:
        parent[key] = next(iter(parent[key].values()))
    elif op == "huge":
        parent[key] = draw(st.sampled_from([2**31, 2**40, 2**63, 10**30, 1e300, float("inf")]))
    elif op == "non_ascii":
        parent[key] = draw(st.sampled_from(["ÿ", "注意力", "😀", "\u202e", "ﬁ"]))
    elif op == "tag":
        parent[key] = "__TAG__"
        return yaml.safe_dump(data, allow_unicode=True).replace("'__TAG__'", draw(st.sampled_from(TAGS)))
    text = yaml.safe_dump(data, allow_unicode=True, default_flow_style=False)
    if op == "duplicate":
        lines = text.splitlines()
        keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("-")]
        i = draw(st.sampled_from(keyed))
        lines.insert(i + 1, lines[i])
        text = "\n".join(lines) + "\n"
    return text


@st.composite
def mutated_recipes(draw: Any) -> str:
    data = copy.deepcopy(BASE_DATA[draw(st.sampled_from(BASES))])
    for _ in range(draw(st.integers(1, 3))):
        if not paths(data):
            break
        text = mutate(data, draw)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            return text  # tags / duplicates: the loader must reject the text itself
        if not isinstance(data, dict):
            return text
    return yaml.safe_dump(data, allow_unicode=True)


# derandomize: `make test` runs the same 500 cases every time (drop it to explore new ones)
@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(text=mutated_recipes())
def test_mutated_recipes_build_or_raise_a_located_recipe_error(text):
    MARKER.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            vla = build(path, device="meta")
        except RecipeError as err:
            assert err.key_path or err.line is not None, f"no location in {err!s}"
            assert err.source, str(err)
        else:
            assert isinstance(vla, VLA)
            assert math.isfinite(sum(p.numel() for p in vla.parameters()))
    assert not MARKER.exists(), "a YAML tag constructed an object"
