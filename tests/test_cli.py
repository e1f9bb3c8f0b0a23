"""The vlablocks command: recipes, show, check (in-process, plus the installed entry point once)."""

import shutil
import subprocess
import sys

import pytest

from vlablocks.cli import main
from vlablocks.recipes.loader import bundled_recipes


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_recipes_lists_every_bundled_recipe_with_its_description(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(bundled_recipes())
    assert any(line.startswith("pi0 ") and "Gemma-300M" in line for line in lines)


def test_show_full_size_recipe_reports_parameters_per_block(capsys):
    code, out, _ = run(capsys, "show", "pi0", "--no-tree")
    assert code == 0
    assert "# recipe pi0 (resolved)" in out and "num_layers: 18" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.split("# parameters")[1].strip().splitlines()[1:]}
    assert set(rows) >= {"vision", "projector", "text", "backbone.vlm", "backbone.action", "suffix", "total"}
    assert int(rows["backbone.action"][0].replace(",", "")) > 300_000_000


def test_show_tree_and_overrides(capsys):
    code, out, _ = run(capsys, "show", "tiny_pi0", "head.num_steps=3")
    assert code == 0 and "num_steps: 3" in out and "# modules" in out and "DeepFusionStack" in out


@pytest.mark.parametrize("name, shape", [("tiny_llava3d_deepfusion", "[2, 16, 4]"), ("tiny_gr00t", "[2, 4, 6]"),
                                         ("tutorial_state_expert", "[2, 16, 4]")])
def test_check_tiny_recipe(capsys, name, shape):
    code, out, _ = run(capsys, "check", name)
    assert code == 0 and out.strip().endswith("ok")
    assert f"predict_action  {shape}" in out


def test_check_refuses_full_size_on_cpu_and_reports_recipe_errors(capsys):
    code, out, _ = run(capsys, "check", "llava3d_deepfusion")
    assert code == 2 and "too many for a CPU check" in out
    code, _, err = run(capsys, "show", "tiny_pi0", "head.num_stepz=3")
    assert code == 1 and "recipe error: override head.num_stepz=3: head.num_stepz: unknown key 'num_stepz'" in err


def test_help_and_usage_errors_return_their_status(capsys):
    assert main(["--help"]) == 0 and "--debug" in capsys.readouterr().out
    assert main(["train", "tiny_pi0", "--data", "d", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "vlablocks train: argument --steps: must be >= 1; got 0 (see vlablocks train --help)\n"


ENTRY_POINT = shutil.which("vlablocks", path=f"{sys.prefix}/bin")


@pytest.mark.skipif(ENTRY_POINT is None, reason="the package is not pip-installed here (make test installs it)")
def test_installed_entry_point_runs():
    exe = ENTRY_POINT
    result = subprocess.run([exe, "recipes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "tiny_pi0" in result.stdout
