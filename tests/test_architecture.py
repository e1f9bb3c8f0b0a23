"""The package map holds: imports run one way (blocks <- encoders <- heads <- policy <- recipes
<- application), no import cycles, function-local imports only for optional heavy
dependencies, and the application layer stays in files and functions one can read in a sitting."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> import name (pyproject.toml's package-dir)
FOLDERS = {"blocks": "vlablocks.blocks", "encoders": "vlablocks.encoders", "heads": "vlablocks.heads",
           "recipes": "vlablocks.recipes", "vlablocks": "vlablocks"}
#: layer -> the layers it may import (itself included). ``io`` holds the small file helpers.
ALLOWED = {
    "blocks": {"blocks"},
    "encoders": {"blocks", "encoders"},
    "heads": {"blocks", "encoders", "heads"},
    "io": {"io"},
    "policy": {"blocks", "encoders", "heads", "io", "policy"},
    "recipes": {"blocks", "encoders", "heads", "io", "policy", "recipes"},
    "data": {"io", "policy", "data"},
    "train": {"blocks", "encoders", "heads", "io", "policy", "recipes", "data", "train"},
    "envs": {"io", "policy", "data", "eval", "envs"},
    "eval": {"io", "policy", "recipes", "train", "envs", "eval"},
    "tools": {"blocks", "encoders", "heads", "io", "policy", "recipes", "data", "train", "eval", "tools"},
    "app": {"blocks", "encoders", "heads", "io", "policy", "recipes", "data", "train", "eval", "envs", "tools", "app"},
}
#: imports that may stay inside a function: optional or heavy dependencies, each with the reason.
LAZY_IMPORTS = {
    "metaworld": "optional (the sim extra)",
    "mujoco": "optional (the sim extra)",
    "imageio": "optional (the sim extra)",
    "imageio_ffmpeg": "optional: mp4 videos when installed, GIF otherwise",
    "torchcodec": "optional: the alternative video decoder (needs the system FFmpeg libraries)",
    "vlablocks.envs.metaworld": "imports metaworld and mujoco (optional) and starts a GL stack",
    "matplotlib": "heavy import, only for plots written after training / by reports",
    "torch.utils.tensorboard": "heavy import (tensorboard), only when a run logs",
    "timm": "heavy import (seconds), only for timm vision backbones",
    "transformers": "heavy import (seconds), only for SigLIP towers and transformers tokenizers",
}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules() -> Iterator[tuple[str, Path]]:
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            yield ".".join((package, *parts)), path


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ALLOWED and parts[1] != "app":
        return parts[1]
    return "app"  # vlablocks.cli, vlablocks.demo, vlablocks itself


def imports(path: Path, module: str) -> Iterator[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` of a source file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in local, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from vlablocks.policy import batch` imports the module batch
                name = f"{base}.{alias.name}"
                yield (name if name in MODULES else base), id(node) in local, node.lineno


MODULES = dict(modules())
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def test_imports_run_one_way():
    wrong = []
    for module, path in MODULES.items():
        for target, _, line in imports(path, module):
            if target.startswith("vlablocks.") and layer(target) not in ALLOWED[layer(module)]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer(module)} imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_function_local_imports_are_only_optional_heavy_dependencies():
    wrong = []
    for module, path in MODULES.items():
        for target, inside, line in imports(path, module):
            if inside and not any(target == name or target.startswith(name + ".") for name in LAZY_IMPORTS):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: import of {target} inside a function")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: sorted({t for t, inside, _ in imports(p, m) if not inside and t in MODULES and t != m})
             for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1 and not (nxt in PACKAGES and node.startswith(nxt + ".")):
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_the_layer_test_catches_a_wrong_import(tmp_path):
    """The checks above can fail: a block importing the policy is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from vlablocks.policy.vla import VLA\n\ndef f():\n    from vlablocks.train import trainer\n")
    found = list(imports(bad, "vlablocks.blocks.bad"))
    assert ("vlablocks.policy.vla", False, 1) in found and ("vlablocks.train.trainer", True, 4) in found
    assert layer("vlablocks.policy.vla") not in ALLOWED["blocks"]


def test_application_files_and_functions_are_readable_in_one_sitting():
    long_files, long_functions = [], []
    for path in sorted((ROOT / "vlablocks").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n")
        if lines > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_every_package_ships_in_the_wheel():
    """pyproject.toml lists packages by hand: a new subpackage missing there would be left out of
    a non-editable install."""
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.S | re.M)
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))
    assert PACKAGES == listed, f"add to pyproject.toml: {sorted(PACKAGES - listed)}; stale: {sorted(listed - PACKAGES)}"
