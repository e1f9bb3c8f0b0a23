"""Bad recipes get errors that name the file, the key path, the expected and the received value."""

import tempfile
from pathlib import Path

import pytest
import yaml

from vlablocks.recipes.builder import build
from vlablocks.recipes.loader import RecipeError, bundled_recipes, load_recipe, parse_yaml


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_with(tmp_path, overrides_yaml: str, name="bad.yaml"):
    """A recipe file extending tiny_pi0 with some keys changed."""
    return write(tmp_path, name, f"extends: tiny_pi0\n{overrides_yaml}")


def expect(path_or_name, match, overrides=()):
    with pytest.raises(RecipeError, match=match) as err:
        build(load_recipe(path_or_name, overrides))
    return err.value


def test_unknown_type_lists_the_valid_ones(tmp_path):
    path = tiny_with(tmp_path, "vision: {type: convnext_huge}\n")
    err = expect(path, r"vision\.type: unknown vision type 'convnext_huge'; valid types: \['convnet', 'patch_vit', 'siglip', 'timm'\]")
    assert err.source == str(path) and err.key_path == "vision.type"


def test_unknown_key_names_the_file_and_lists_valid_keys(tmp_path):
    path = tiny_with(tmp_path, "head: {num_stepz: 5}\n")
    err = expect(path, r"head\.num_stepz: unknown key 'num_stepz' for FlowMatchingHead; valid keys: \[.*'num_steps'")
    assert str(path) in str(err)


def test_wrong_value_type(tmp_path):
    path = tiny_with(tmp_path, "head: {num_steps: ten}\n")
    expect(path, r"head\.num_steps: expected int; got str 'ten'")
    path = tiny_with(tmp_path, "policy: {horizon: 4.5}\n", "bad2.yaml")
    expect(path, r"policy\.horizon: expected int; got float 4.5")
    path = tiny_with(tmp_path, "suffix: {causal: 'yes'}\n", "bad3.yaml")
    expect(path, r"suffix\.causal: expected bool; got str 'yes'")
    path = tiny_with(tmp_path, "head: {solver: rk45}\n", "bad4.yaml")
    expect(path, r"head: FlowMatchingHead: unknown solver 'rk45'; valid names: \['euler', 'heun', 'midpoint'\]")


def test_missing_required_key(tmp_path):
    text = yaml.safe_dump({k: v for k, v in load_recipe("tiny_pi0").data.items()})
    data = yaml.safe_load(text)
    del data["policy"]["horizon"]
    path = write(tmp_path, "missing.yaml", yaml.safe_dump(data))
    expect(path, r"policy: missing required key\(s\) \['horizon'\] for PolicyConfig")
    del data["suffix"]
    write(tmp_path, "missing.yaml", yaml.safe_dump(data))
    expect(tmp_path / "missing.yaml", r"suffix: missing required section 'suffix'")


def test_head_space_mismatch_explains_the_constraint(tmp_path):
    err = expect("tiny_pi0", r"expert 1 \('action'\) has head space HeadSpace\(num_heads=2, .*but the base expert 0 \('vlm'\) has "
                 r"HeadSpace\(num_heads=4, .*must equal the base's",
                 overrides=["backbone.experts.1.head_space={num_heads: 2, num_kv_heads: 1, head_dim: 16}"])
    assert err.key_path == "backbone"


def test_layer_map_out_of_range(tmp_path):
    expect("tiny_pi0", r"backbone: DeepFusionStack: layer map of expert 1 \('action'\) names layers \[5\], but the base has 2 layers",
           overrides=["backbone.experts.1.layers=[0, 5]"])
    expect("tiny_pi0", r"backbone\.experts\.1: expert: give at most one of layers / every_kth_layer / first_n_layers",
           overrides=["backbone.experts.1.layers=[0]", "backbone.experts.1.first_n_layers=1"])


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\npolicy: {horizon: 2}\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match=r"extends cycle: a\.yaml -> b\.yaml -> a\.yaml"):
        load_recipe(tmp_path / "a.yaml")


def test_derived_keys_cannot_be_set(tmp_path):
    path = tiny_with(tmp_path, "suffix: {width: 99}\n")
    expect(path, r"suffix\.width: 'width' is derived by the builder from the rest of the recipe; remove it")


def test_yaml_problems_are_recipe_errors(tmp_path):
    path = write(tmp_path, "dup.yaml", "extends: tiny_pi0\nhead: {num_steps: 3}\nhead: {num_steps: 4}\n")
    with pytest.raises(RecipeError, match="duplicate key 'head'"):
        load_recipe(path)
    path = write(tmp_path, "tag.yaml", "policy: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="YAML tag '!!python/object/apply:os.system' is not allowed"):
        load_recipe(path)
    path = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(RecipeError, match="a recipe must be a YAML mapping; got list"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"unknown recipe 'no_such_recipe'; bundled recipes: \["):
        load_recipe("no_such_recipe")
    with pytest.raises(RecipeError, match="an override must look like key.path=value"):
        load_recipe("tiny_pi0", ["head.num_steps"])
    with pytest.raises(RecipeError, match=r"list index must be 0\.\.1; got '7'"):
        load_recipe("tiny_pi0", ["backbone.experts.7.width=3"])


def test_unknown_section_and_sources(tmp_path):
    path = tiny_with(tmp_path, "heads: {num_steps: 3}\n")
    expect(path, r"unknown section 'heads'; valid sections")
    recipe = load_recipe(tiny_with(tmp_path, "head: {num_steps: 3}\n", "ok.yaml"), ["policy.horizon=6"])
    assert recipe.source_of("head.num_steps").endswith("ok.yaml")
    assert recipe.source_of("policy.horizon") == "<command-line override>"
    assert recipe.source_of("backbone.experts") == str(bundled_recipes()["tiny_pi0"])
    assert recipe.source_of("suffix.time_fusion.type") == str(bundled_recipes()["pi0"])
    assert recipe.data["policy"]["horizon"] == 6 and recipe.data["head"]["num_steps"] == 3


def test_a_different_type_replaces_the_parent_node():
    recipe = load_recipe("tiny_llava3d_deepfusion")
    assert recipe.data["vision"]["type"] == "convnet"
    assert "config" not in recipe.data["vision"] and "select_layer" not in recipe.data["vision"]  # the parent's SigLIP keys


MARKER = Path(tempfile.gettempdir()) / "vlablocks_yaml_tag_marker"
TAGS = [
    f"!!python/object/apply:os.system ['touch {MARKER}']",
    f"!!python/object/apply:subprocess.call [['touch', '{MARKER}']]",
    "!!python/object:collections.OrderedDict {}",
    "!!python/name:os.system",
    "!!python/tuple [1, 2]",
    "!!binary aGVsbG8=",
    "!!set {a: null}",
    "!!timestamp 2001-12-14",
    "!custom value",
]


@pytest.mark.parametrize("tag", TAGS)
def test_every_yaml_tag_is_refused_with_its_key_path_and_nothing_is_constructed(tmp_path, tag):
    MARKER.unlink(missing_ok=True)
    path = write(tmp_path, "tagged.yaml", f"extends: tiny_pi0\nhead:\n  num_steps: {tag}\n")
    with pytest.raises(RecipeError, match="YAML tag .* is not allowed in a recipe") as err:
        load_recipe(path)
    assert err.value.key_path == "head.num_steps" and err.value.source == str(path)
    assert not MARKER.exists()
    with pytest.raises(RecipeError, match="YAML tag") as err:  # the same through an override
        load_recipe("tiny_pi0", [f"head.num_steps={tag}"])
    assert err.value.key_path == "head.num_steps" and not MARKER.exists()


def test_duplicate_keys_self_referencing_aliases_and_syntax_errors_are_located(tmp_path):
    path = write(tmp_path, "dup.yaml", "extends: tiny_pi0\nhead:\n  num_steps: 3\n  num_steps: 4\n")
    with pytest.raises(RecipeError, match="duplicate key 'num_steps'") as err:
        load_recipe(path)
    assert err.value.key_path == "head.num_steps"
    path = write(tmp_path, "cycle.yaml", "extends: tiny_pi0\nhead: &h {num_steps: 3, more: *h}\n")
    with pytest.raises(RecipeError, match="contains it") as err:
        load_recipe(path)
    assert err.value.key_path == "head.more"
    path = write(tmp_path, "syntax.yaml", "extends: tiny_pi0\nhead:\n  num_steps: [3\n")
    with pytest.raises(RecipeError, match="invalid YAML") as err:
        load_recipe(path)
    assert err.value.line is not None and f"{path}: line {err.value.line}: invalid YAML" in str(err.value)


def test_an_alias_bomb_is_refused():
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    with pytest.raises(RecipeError, match="more than .* YAML nodes"):
        parse_yaml("\n".join(levels) + "\n", "<bomb>")


def test_a_type_that_is_not_a_name_is_an_unknown_type(tmp_path):
    path = tiny_with(tmp_path, "vision: {type: {type: patch_vit}}\n")
    err = expect(path, r"unknown vision type \{'type': 'patch_vit'\}; valid types")
    assert err.key_path == "vision.type"


def test_sizes_beyond_the_block_limit_and_impossible_allocations_are_recipe_errors(tmp_path):
    """Oversized integers stop at the schema (a typo must not exhaust memory first); sizes that are
    each plausible but cannot be allocated together stop at the block that needed them."""
    expect(tiny_with(tmp_path, "vision: {width: 2097152}\n"),
           r"vision\.width: expected an int of magnitude at most 1048576; got 2097152")
    expect(tiny_with(tmp_path, "backbone: {num_layers: 2147483648}\n", "b.yaml"),
           r"backbone\.num_layers: expected an int of magnitude at most 1048576; got 2147483648")
    # 131072^2 patches x 4096 wide: a 256 TB position table (the allocator refuses at once)
    err = expect(tiny_with(tmp_path, "vision: {image_size: 1048576, width: 4096}\n", "c.yaml"),
                 r"vision: PatchViT: cannot allocate the block with these sizes")
    assert err.key_path == "vision"
    # settings that are counts or seeds are not sizes: a large seed is fine
    recipe = load_recipe(tiny_with(tmp_path, "train: {seed: 1099511627776}\n", "d.yaml"))
    from vlablocks.train.config import train_config  # noqa: PLC0415 - only this test needs it

    assert train_config(recipe, [], None).seed == 2**40
