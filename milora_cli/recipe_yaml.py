"""Recipe files and `section.key=value` overrides as YAML (recipe.py validates what they hold)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from milora_cli import atomic
from milora_cli.errors import RecipeError


class _Yaml12(yaml.SafeLoader):
    """Recipes and overrides are read with YAML 1.2's booleans, true/false only: YAML 1.1 (PyYAML's default) also reads
    on/off/yes/no as booleans, which refused `packing: off` and `mixed_precision: no`. A bool field still takes those
    words (pydantic reads them as booleans)."""

    yaml_implicit_resolvers = {first: [(tag, re.compile("^(?:true|True|TRUE|false|False|FALSE)$") if tag.endswith(":bool") else regexp)
                                       for tag, regexp in resolvers] for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The nested dict of a YAML recipe file; one line naming the file and the line where it is not YAML."""
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        raw = yaml.load(atomic.read_text(path, RecipeError), Loader=_Yaml12) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, adapter, data, train, output)")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as recipe YAML (1e-4, true, off, [q_proj, v_proj])."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{override}' is not of the form section.key=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override '{override}': '{part}' is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.load(text, Loader=_Yaml12) if text else None
    except yaml.YAMLError:
        node[leaf] = text
