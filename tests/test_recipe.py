"""Recipe validation, overrides and error messages; every recipe shipped in recipes/ validates."""

from pathlib import Path

import pytest
import yaml

from milora_cli.errors import RecipeError
from milora_cli.recipe import apply_override, dump_recipe, load_recipe, validate

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.y*ml"))
MINIMAL = {"data": {"builtin": "quickstart"}}


def test_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"quickstart", "commonsense_llama3", "commonsense_llama2", "math_llama2", "instruct_llama2"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert validate(yaml.safe_load(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize("name", ["commonsense_llama3", "commonsense_llama2", "instruct_llama2"])
def test_paper_settings_rank_32(name):
    recipe = load_recipe(next(p for p in RECIPES if p.stem == name))
    assert (recipe.adapter.init, recipe.adapter.r, recipe.adapter.alpha, recipe.adapter.dropout) == ("milora", 32, 32, 0.05)
    assert recipe.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (recipe.train.lr, recipe.train.scheduler, recipe.train.warmup_steps, recipe.train.epochs) == (3e-4, "linear", 100, 3)
    assert recipe.train.global_batch_size == 16  # on any number of GPUs (training/distributed.py)


def test_math_recipe_rank_64():
    recipe = load_recipe(next(p for p in RECIPES if p.stem == "math_llama2"))
    assert (recipe.adapter.r, recipe.adapter.alpha, recipe.data.path) == (64, 64, "meta-math/MetaMathQA")
    assert recipe.train.global_batch_size == 16


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {builtin: quickstart}\nadapter:\n  rnak: 16\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert "'adapter.rnak'" in message and "did you mean 'adapter.r'" in message and "\n" not in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("adapter.r=0", "adapter.r: Input should be greater than or equal to 1 (got 0)"),
        ("adapter.dropout=1.5", "adapter.dropout: Input should be less than 1"),
        ("adapter.init=svd", "adapter.init: Input should be 'milora', 'pissa' or 'lora'"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.lrr=1", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("model.dtype=fp8", "model.dtype: Input should be 'fp32', 'bf16', 'fp16' or 'fp64'"),
        ("adapter.r", "is not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(override, expected):
    with pytest.raises(RecipeError, match=None) as error:
        raw = {"data": {"builtin": "quickstart"}}
        apply_override(raw, override)
        validate(raw)
    assert expected in str(error.value)


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(path, ["adapter.r=16", "train.lr=1e-4", "adapter.target_modules=[q_proj, v_proj]", "output.dir=out/x"])
    assert recipe.adapter.r == 16 and recipe.train.lr == 1e-4 and recipe.output.dir == "out/x"
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]


def test_alpha_defaults_follow_the_paper():
    assert validate({**MINIMAL, "adapter": {"init": "milora", "r": 32}}).adapter.alpha == 32
    assert validate({**MINIMAL, "adapter": {"init": "lora", "r": 32}}).adapter.alpha == 64
    assert validate({**MINIMAL, "adapter": {"init": "lora", "r": 32, "alpha": 8}}).adapter.alpha == 8


def test_exactly_one_data_source():
    with pytest.raises(RecipeError, match="exactly one of data.path and data.builtin"):
        validate({"data": {"builtin": "quickstart", "path": "x.json"}})
    with pytest.raises(RecipeError, match="'data' is required"):
        validate({})


def test_yaml_errors_are_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("adapter: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
