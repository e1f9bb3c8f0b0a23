"""Recipe files: YAML with ``extends:`` inheritance and dotted ``key=value`` overrides.

A recipe is a YAML mapping read with a safe loader that also rejects duplicate keys. A recipe
may name a parent with ``extends: NAME_OR_PATH`` (a bundled recipe name, or a path relative to
the file); mappings merge key by key (the child wins) unless the child names a different
``type:`` (then its mapping replaces the parent's whole), anything else is replaced, and
``null`` replaces too (``geometry: null`` switches a section off). Overrides ``a.b.c=VALUE`` (VALUE
parsed as YAML, numbers as YAML 1.2 reads them: ``5e-4`` is a float; list items by index,
``experts.1.width=512``) apply last. Every key remembers
the file (or override) that set it, so errors can say where a bad key came from.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUNDLED_DIR = Path(__file__).resolve().parent
OVERRIDE_SOURCE = "<command-line override>"


class RecipeError(ValueError):
    """A recipe problem, located by file and dotted key path (or, for YAML that does not parse,
    by file and 1-based ``line``)."""

    def __init__(self, message: str, key_path: str = "", source: str = "", line: int | None = None) -> None:
        self.message, self.key_path, self.source, self.line = message, key_path, source, line
        where = ": ".join(part for part in (source, key_path, "" if line is None else f"line {line}") if part)
        super().__init__(f"{where}: {message}" if where else message)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"unhashable key {key!r}", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)

#: the only YAML tags a recipe may use (explicitly or implicitly): plain values, lists, mappings, ``<<`` merges.
PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge"))
#: nodes visited at most (aliases count each time they are used): a bound on alias bombs.
MAX_NODES = 100_000


#: YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: scientific notation without a dot (``5e-4``, ``1E6``).
_YAML12_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def parse_override_value(text: str, source: str = OVERRIDE_SOURCE, key_path: str = "") -> Any:
    """The value of a ``key=VALUE`` override: YAML (checked as :func:`parse_yaml` checks a recipe),
    except that a number in scientific notation without a dot (``5e-4``, ``-2e+3``) is the float
    YAML 1.2 makes of it, not the string PyYAML's YAML 1.1 resolver returns."""
    if _YAML12_FLOAT.fullmatch(text.strip()):
        return float(text)
    return parse_yaml(text, source, key_path)


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _check_nodes(root: yaml.Node, key_path: str, source: str) -> None:
    """Refuse what a recipe has no use for, before anything is constructed: tags other than
    :data:`PLAIN_TAGS`, duplicate or non-scalar keys, self-referencing aliases, alias bombs."""
    visited = 0
    stack: list[tuple[yaml.Node, str, frozenset[int]]] = [(root, key_path, frozenset())]
    while stack:
        node, path, ancestors = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise RecipeError(f"the recipe expands to more than {MAX_NODES} YAML nodes (an alias bomb?)", path, source)
        if id(node) in ancestors:
            raise RecipeError("an alias refers to a mapping or list that contains it (a cycle)", path, source)
        if node.tag not in PLAIN_TAGS:
            raise RecipeError(
                f"YAML tag {_short_tag(node.tag)!r} is not allowed in a recipe: only plain values, lists and "
                f"mappings are read, nothing is constructed from a tag", path, source)
        inside = ancestors | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, _join(path, i), inside) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise RecipeError("a key must be a plain value, not a list or mapping", path, source)
                if key_node.tag not in PLAIN_TAGS:
                    raise RecipeError(f"YAML tag {_short_tag(key_node.tag)!r} is not allowed in a recipe", path, source)
                child = _join(path, key_node.value)
                if (key_node.tag, key_node.value) in seen:
                    raise RecipeError(f"duplicate key {key_node.value!r}", child, source)
                seen.add((key_node.tag, key_node.value))
                stack.append((value_node, child, inside))


def parse_yaml(text: str, source: str, key_path: str = "") -> Any:
    """Parse recipe YAML safely: the node tree is checked (:func:`_check_nodes`) before a safe,
    duplicate-rejecting loader constructs plain Python values from it. Every failure is a
    :class:`RecipeError` located by key path (or by line, when the text does not parse)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        _check_nodes(node, key_path, source)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = None if mark is None else mark.line + 1
        problem = " ".join(part for part in (err.context, err.problem) if part) or str(err)
        raise RecipeError(f"invalid YAML: {problem}", key_path, source, line if not key_path else None) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"invalid YAML: {err}", key_path, source) from None
    except RecursionError:
        raise RecipeError("the YAML is nested too deeply", key_path, source) from None


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe.

    Attributes:
        name: the bundled name or the file stem.
        data: the merged mapping (``extends`` resolved and removed, overrides applied).
        sources: dotted key path -> the file or override that set it.
        overrides: dotted key path -> the ``key=value`` override text that set it, in order.
    """

    name: str
    data: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)

    def source_of(self, key_path: str) -> str:
        """The file that set ``key_path`` (or its nearest ancestor)."""
        parts = key_path.split(".") if key_path else []
        while parts:
            found = self.sources.get(".".join(parts))
            if found:
                return found
            parts.pop()
        return self.sources.get("", "")

    def error(self, message: str, key_path: str) -> RecipeError:
        """A :class:`RecipeError` located at ``key_path`` in this recipe; the source names the
        command-line overrides at or under ``key_path`` too (the likely culprits)."""
        source = self.source_of(key_path)
        inside = [text for path, text in self.overrides.items()
                  if not key_path or path == key_path or path.startswith(key_path + ".")]
        if inside and source != OVERRIDE_SOURCE:
            source = f"{source} with override {', '.join(inside)}"
        elif inside:
            source = f"override {', '.join(inside)}"
        return RecipeError(message, key_path, source)

    def record_override(self, key_path: str, text: str) -> None:
        """Note that the override ``text`` set ``key_path`` (for :meth:`error`)."""
        self.overrides.pop(key_path, None)
        self.overrides[key_path] = text.strip()


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe names -> files."""
    return {path.stem: path for path in sorted(BUNDLED_DIR.glob("*.yaml"))}


def resolve_recipe_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A bundled recipe name, or a path (tried relative to ``relative_to`` first)."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        candidates = [relative_to / text] if relative_to is not None else []
        candidates.append(Path(text))
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        if any(candidate.is_dir() for candidate in candidates):
            raise RecipeError(f"recipe file {text!r} is a directory; give a .yaml file or a bundled recipe name")
        raise RecipeError(f"recipe file {text!r} not found")
    bundled = bundled_recipes()
    if text not in bundled:
        raise RecipeError(f"unknown recipe {text!r}; bundled recipes: {sorted(bundled)} (or give a path to a .yaml file)")
    return bundled[text]


def load_recipe(name_or_path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe, resolve its ``extends`` chain and apply ``key=value`` overrides."""
    path = resolve_recipe_path(name_or_path)
    data, sources = _load_chain(path, ())
    recipe = Recipe(path.stem, data, sources)
    for override in overrides:
        _apply_override(recipe, override)
    return recipe


def recipe_from_dict(data: Mapping[str, Any], name: str = "recipe", source: str = "<dict>") -> Recipe:
    """A recipe from an in-memory mapping (no ``extends``)."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe must be a mapping; got {type(data).__name__}", source=source)
    data = copy.deepcopy(dict(data))
    if "extends" in data:
        raise RecipeError("extends is only supported in recipe files", "extends", source)
    sources: dict[str, str] = {}
    _record(data, "", source, sources)
    return Recipe(name, data, sources)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe: {err}", source=str(path)) from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a YAML mapping; got {type(data).__name__}", source=str(path))
    return data


def _load_chain(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError(f"extends cycle: {cycle}", "extends", str(chain[-1]))
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    sources: dict[str, str] = {}
    if parent is None:
        _record(data, "", str(path), sources)
        return data, sources
    if not isinstance(parent, str):
        raise RecipeError(f"extends must be a recipe name or path; got {parent!r}", "extends", str(path))
    try:
        parent_path = resolve_recipe_path(parent, relative_to=path.parent)
    except RecipeError as err:
        raise RecipeError(err.message, "extends", str(path)) from None
    base, sources = _load_chain(parent_path, (*chain, path))
    _merge(base, data, "", str(path), sources)
    return base, sources


def _record(value: Any, key_path: str, source: str, sources: dict[str, str]) -> None:
    sources[key_path] = source
    if isinstance(value, dict):
        for key, item in value.items():
            _record(item, _join(key_path, key), source, sources)


def _merge(base: dict[str, Any], child: Mapping[str, Any], key_path: str, source: str, sources: dict[str, str]) -> None:
    for key, value in child.items():
        path = _join(key_path, key)
        parent = base.get(key)
        same_type = isinstance(parent, dict) and isinstance(value, dict) and value.get("type", parent.get("type")) == parent.get("type")
        if same_type:
            _merge(parent, value, path, source, sources)
        else:
            for stale in [p for p in sources if p == path or p.startswith(path + ".")]:
                del sources[stale]
            base[key] = value
            _record(value, path, source, sources)


def _join(key_path: str, key: Any) -> str:
    return f"{key_path}.{key}" if key_path else str(key)


def _apply_override(recipe: Recipe, override: str) -> None:
    key_path, sep, text = override.partition("=")
    key_path = key_path.strip()
    if not sep or not key_path:
        raise RecipeError(f"an override must look like key.path=value; got {override!r}", source=OVERRIDE_SOURCE)
    value = parse_override_value(text, OVERRIDE_SOURCE, key_path)
    parts = key_path.split(".")
    node: Any = recipe.data
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]))
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key_path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"cannot set a key inside a {type(node).__name__}", key_path, OVERRIDE_SOURCE)
    for stale in [p for p in recipe.sources if p == key_path or p.startswith(key_path + ".")]:
        del recipe.sources[stale]
    _record(value, key_path, OVERRIDE_SOURCE, recipe.sources)
    recipe.record_override(key_path, override)


def _child(node: Any, part: str, key_path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key_path)]
    if isinstance(node, dict):
        if node.get(part) is None:
            node[part] = {}
        return node[part]
    raise RecipeError(f"cannot descend into a {type(node).__name__}", key_path, OVERRIDE_SOURCE)


def _index(node: list, part: str, key_path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"list index must be 0..{len(node) - 1}; got {part!r}", key_path, OVERRIDE_SOURCE)
    return int(part)
