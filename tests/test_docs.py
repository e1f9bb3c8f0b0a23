"""The Python snippets of README.md and docs/*.md run, in order, one namespace per file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_snippets_run(path, capsys):
    snippets = SNIPPET.findall(path.read_text())
    namespace: dict = {}
    for index, code in enumerate(snippets):
        exec(compile(code, f"{path.name}[snippet {index}]", "exec"), namespace)


def test_relative_links_exist():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    for path in DOCS:
        for target in link.findall(path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


#: top-level folders of the repository: a backticked path under one of them must exist
TRACKED = ("blocks", "encoders", "heads", "recipes", "vlablocks", "tests", "benchmarks", "docs")
FILE_REFERENCE = re.compile(r"`((?:%s)/[\w./-]*)`" % "|".join(TRACKED))


def test_referenced_files_exist():
    """Backticked repository paths (``recipes/pi0.yaml``, ``blocks/fusion.py``) name real files or folders."""
    missing = []
    for path in DOCS:
        for target in FILE_REFERENCE.findall(path.read_text()):
            if not (ROOT / target).exists():
                missing.append(f"{path.name}: {target}")
    assert not missing, missing


def test_recipe_key_reference_is_generated_and_complete():
    from vlablocks.tools.recipe_reference import BEGIN, END, UNDOCUMENTED, reference_markdown

    text = (ROOT / "docs" / "recipes.md").read_text()
    generated = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert generated + "\n" == reference_markdown(), "regenerate: python -m vlablocks.tools.recipe_reference docs/recipes.md"
    assert UNDOCUMENTED not in generated
    from vlablocks.recipes.registry import REGISTRIES

    for registry in REGISTRIES.values():  # every registered type has its own table
        for name in registry.names():
            assert f"`type: {name}`" in generated, name


def test_mask_pictures_are_generated_from_the_recipes():
    from vlablocks.tools.mask_pictures import SECTION, mask_markdown

    text = (ROOT / "docs" / "architecture.md").read_text()
    begin, end = f"<!-- {SECTION}:begin -->\n", f"<!-- {SECTION}:end -->"
    current = text.split(begin, 1)[1].split(end, 1)[0]
    assert current == mask_markdown(), "regenerate: python -m vlablocks.tools.mask_pictures docs/architecture.md"


def test_every_exported_block_is_in_blocks_md():
    import inspect

    import vlablocks.blocks
    import vlablocks.encoders
    import vlablocks.heads

    text = (ROOT / "docs" / "blocks.md").read_text()
    missing = [f"{module.__name__}.{name}" for module in (vlablocks.blocks, vlablocks.encoders, vlablocks.heads)
               for name in module.__all__ if inspect.isclass(getattr(module, name)) and not re.search(rf"\b{name}\b", text)]
    assert not missing, f"document these in docs/blocks.md: {missing}"
