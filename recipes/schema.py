"""Recipe keys are constructor arguments: validate a mapping against a callable's signature.

``call_with(fn, node, ...)`` checks every key of ``node`` against ``fn``'s keyword parameters
(unknown keys, missing required ones, keys the builder derives itself) and every value against
the parameter's annotation, then calls ``fn``. There is no second schema to drift: the
signature is the schema. Errors raised by the constructor itself become recipe errors at the
node's key path.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from vlablocks.recipes.loader import Recipe, RecipeError

#: parameters that are never recipe keys.
HIDDEN_PARAMETERS = frozenset({"self", "device", "dtype"})
#: the largest integer magnitude a block argument may have (a width, layer count or vocabulary
#: beyond it is a typo that would exhaust memory before any error could name it).
MAX_BLOCK_INT = 2**20
#: the largest integer of settings that are counts or seeds, not sizes (``train.steps``, ``train.seed``).
MAX_SETTING_INT = 2**63 - 1


def recipe_parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``fn`` that a recipe may set."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    return {
        name: param
        for name, param in inspect.signature(target).parameters.items()
        if name not in HIDDEN_PARAMETERS and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    }


def annotations_of(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved type hints of ``fn``'s parameters."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to no checking for them
        return {}


def describe(annotation: Any) -> str:
    """A readable name for an annotation (``int``, ``float | None``, ``'sdpa' | 'eager'``)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(describe(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_value(value: Any, annotation: Any, key_path: str, recipe: Recipe, max_int: int = MAX_BLOCK_INT) -> Any:
    """Check ``value`` against ``annotation``; returns it converted (int -> float, list -> tuple).

    Integers must lie in ``[-max_int, max_int]``."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    mismatch = recipe.error(f"expected {describe(annotation)}; got {_type_name(value)} {value!r}", key_path)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise recipe.error(f"expected one of {list(args)}; got {value!r}", key_path)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return check_value(value, option, key_path, recipe, max_int)
            except RecipeError:
                continue
        raise mismatch
    if annotation is type(None):
        if value is None:
            return None
        raise mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise mismatch
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise mismatch
        if abs(value) > max_int:
            raise recipe.error(f"expected an int of magnitude at most {max_int}; got {value}", key_path)
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise mismatch
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list):
            raise mismatch
        item = args[0] if args else Any
        items = [check_value(v, item, f"{key_path}.{i}", recipe, max_int) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, dict):
            raise mismatch
        item = args[1] if len(args) == 2 else Any
        return {k: check_value(v, item, f"{key_path}.{k}", recipe, max_int) for k, v in value.items()}
    raise recipe.error(f"this argument ({describe(annotation)}) cannot be set from a recipe", key_path)


def call_with(
    fn: Callable[..., Any],
    node: Any,
    key_path: str,
    recipe: Recipe,
    derived: Mapping[str, Any] | None = None,
    converters: Mapping[str, Callable[[Any, str], Any]] | None = None,
    max_int: int = MAX_BLOCK_INT,
) -> Any:
    """Validate ``node`` against ``fn``'s signature and call it.

    Args:
        fn: a class or function; its keyword parameters are the valid keys.
        node: the recipe mapping (without its ``type`` key).
        key_path: where ``node`` sits in the recipe, for errors.
        recipe: the recipe, for error locations.
        derived: arguments the builder supplies (sizes resolved from other blocks); a recipe
            that sets one of them gets an error.
        converters: per-key functions ``(value, key_path) -> argument`` for nested nodes.
        max_int: the largest integer magnitude accepted (block sizes: :data:`MAX_BLOCK_INT`).

    A constructor's ``ValueError`` / ``TypeError``, and an allocation that fails or overflows
    (``RuntimeError``, ``MemoryError``, ``OverflowError``: sizes too large together), become a
    :class:`RecipeError` at ``key_path``.
    """
    derived = dict(derived or {})
    converters = dict(converters or {})
    name = getattr(fn, "__name__", str(fn))
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise recipe.error(f"expected a mapping of {name} arguments; got {_type_name(node)} {node!r}", key_path)
    params = recipe_parameters(fn)
    settable = sorted(p for p in params if p not in derived)
    for key in node:
        sub = f"{key_path}.{key}" if key_path else str(key)
        if key in derived:
            raise recipe.error(f"{key!r} is derived by the builder from the rest of the recipe; remove it", sub)
        if key not in params:
            raise recipe.error(f"unknown key {key!r} for {name}; valid keys: {settable}", sub)
    missing = [p for p, param in params.items() if param.default is param.empty and p not in node and p not in derived]
    if missing:
        raise recipe.error(f"missing required key(s) {missing} for {name}; valid keys: {settable}", key_path)
    hints = annotations_of(fn)
    kwargs: dict[str, Any] = {}
    for key, value in node.items():
        sub = f"{key_path}.{key}" if key_path else str(key)
        if key in converters:
            kwargs[key] = converters[key](value, sub)
        else:
            kwargs[key] = check_value(value, hints.get(key, Any), sub, recipe, max_int)
    kwargs.update(derived)
    try:
        return fn(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError, OverflowError) as err:
        raise recipe.error(f"{name}: {err}", key_path) from err
    except (RuntimeError, MemoryError) as err:
        raise recipe.error(f"{name}: cannot allocate the block with these sizes ({err})", key_path) from err
