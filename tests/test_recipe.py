"""Recipe validation, overrides and error messages; every recipe shipped in recipes/ validates."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from milora_cli.errors import RecipeError
from milora_cli.recipe import Recipe, apply_override, dump_recipe, load_recipe, validate

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
        ("adapter.init=svd", "adapter.init: Input should be 'milora', 'pissa', 'lora' or 'mica'"),
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


def _sections() -> Iterator[tuple[str, type[BaseModel]]]:
    for name, field in Recipe.model_fields.items():
        assert isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel), name
        yield name, field.annotation


def _literal_values(annotation: Any, in_list: bool = False) -> Iterator[tuple[str, bool]]:
    """Every value of every Literal inside an annotation (`Literal[...] | None`, `list[Literal[...]]`), with
    whether it sits in a list."""
    if get_origin(annotation) is Literal:
        yield from ((value, in_list) for value in get_args(annotation))
        return
    for inner in get_args(annotation):
        yield from _literal_values(inner, in_list or get_origin(annotation) is list)


def _choices() -> list[tuple[str, str, str, bool]]:
    return [(section, key, value, in_list) for section, model in _sections() for key, field in model.model_fields.items()
            for value, in_list in _literal_values(field.annotation)]


def _bool_fields() -> list[tuple[str, str]]:
    return [(section, key) for section, model in _sections() for key, field in model.model_fields.items() if field.annotation is bool]


def _recipe_file(path: Path, section: str, key: str, text: str) -> Path:
    """A recipe file written by hand, so that `text` stands in it unquoted, as a user types it."""
    sections = {"data": {"builtin": "quickstart"}}
    sections.setdefault(section, {})[key] = text
    path.write_text("".join(f"{name}:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items()) for name, keys in sections.items()))
    return path


def test_the_schema_walk_finds_the_choices_yaml_1_1_reads_as_booleans():
    choices = {(section, key, value) for section, key, value, _ in _choices()}
    assert {("data", "packing", "on"), ("data", "packing", "off"), ("train", "mixed_precision", "no")} <= choices
    assert ("eval", "tasks", "boolq") in choices and ("adapter", "target_modules", "all-linear") in choices
    assert {("data", "train_on_prompt"), ("model", "trust_remote_code")} <= set(_bool_fields())


@pytest.mark.parametrize("section, key, value, in_list", _choices(), ids=lambda x: str(x))
def test_every_choice_of_the_schema_loads_unquoted_from_a_file_and_an_override(tmp_path, section, key, value, in_list):
    text = f"[{value}]" if in_list else value
    expected = [value] if in_list else value
    if (section, key, value) == ("output", "report_to", "none"):
        expected = []  # `none` is the empty list of trackers, as in transformers' report_to
    from_file = load_recipe(_recipe_file(tmp_path / "file.yaml", section, key, text))
    from_override = load_recipe(_recipe_file(tmp_path / "minimal.yaml", "data", "builtin", "quickstart"), [f"{section}.{key}={text}"])
    assert getattr(getattr(from_file, section), key) == expected
    assert getattr(getattr(from_override, section), key) == expected


@pytest.mark.parametrize("word, meaning", [("true", True), ("false", False), ("yes", True), ("no", False), ("on", True), ("off", False)])
def test_boolean_fields_take_every_yaml_boolean_word(tmp_path, word, meaning):
    for section, key in _bool_fields():
        from_file = load_recipe(_recipe_file(tmp_path / "file.yaml", section, key, word))
        from_override = load_recipe(_recipe_file(tmp_path / "minimal.yaml", "data", "builtin", "quickstart"), [f"{section}.{key}={word}"])
        assert getattr(getattr(from_file, section), key) is meaning, (section, key)
        assert getattr(getattr(from_override, section), key) is meaning, (section, key)
