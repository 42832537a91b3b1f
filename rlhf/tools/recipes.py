"""`rlhf recipes` and `rlhf init RECIPE DIR`: the recipe book that ships with the package.

The recipes are the folders of `configs/` in a checkout, installed as the package `rlhf.recipes` (setup.py maps
it onto that folder), so they are found the same way from a wheel and from an editable install. A recipe is a
folder with a YAML per stage and a `recipe.yaml` (name, model, method, data, cost, run_root) that the listing reads.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from rlhf.config import ConfigError

RECIPE_FILE = "recipe.yaml"
COLUMNS = ("name", "model", "method", "data", "cost")


@dataclass
class Recipe:
    name: str
    model: str
    method: str
    data: str
    cost: str
    run_root: str
    folder: Traversable

    def stage_files(self) -> list[Traversable]:
        """The recipe's YAMLs but recipe.yaml (a stage config each, or the tiny world's arguments)."""
        files = [f for f in self.folder.iterdir() if f.name.endswith(".yaml") and f.name != RECIPE_FILE]
        return sorted(files, key=lambda f: f.name)


def recipe_book() -> Traversable:
    """The installed recipe book; in a checkout whose install predates it, the checkout's configs/."""
    try:
        return importlib.resources.files("rlhf.recipes")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parents[2] / "configs"
        if not checkout.is_dir():
            raise
        return checkout


def list_recipes() -> list[Recipe]:
    """Every folder of the recipe book with a recipe.yaml, by name (configs/accelerate holds launch configs)."""
    found = []
    for folder in recipe_book().iterdir():
        meta_file = folder / RECIPE_FILE
        if not folder.is_dir() or not meta_file.is_file():
            continue
        meta = yaml.safe_load(meta_file.read_text(encoding="utf-8")) or {}
        fields = {k: str(meta.get(k, "")) for k in (*COLUMNS, "run_root")}
        found.append(Recipe(**fields | {"name": fields["name"] or folder.name}, folder=folder))
    return sorted(found, key=lambda r: r.name)


def find_recipe(name: str) -> Recipe:
    recipes = {r.folder.name: r for r in list_recipes()}
    if name not in recipes:
        raise ConfigError(f"no recipe {name!r}; the shipped ones: {', '.join(sorted(recipes))} (see `rlhf recipes`)")
    return recipes[name]


def format_recipes(recipes: list[Recipe]) -> str:
    """One line per recipe: name, model, method, data, cost."""
    width = max([len(r.name) for r in recipes] + [len("recipe")])
    lines = [f"{'recipe':<{width}}  model | method | data | cost"]
    lines += [f"{r.name:<{width}}  {r.model} | {r.method} | {r.data} | {r.cost}" for r in recipes]
    return "\n".join(lines)


def init_recipe(name: str, dest: str | Path, force: bool = False) -> list[Path]:
    """Copy recipe `name`'s YAMLs into `dest` and write `dest/recipe.yaml` with `run_root: <dest>/runs` as an
    absolute path (the stages then write under it wherever the commands run from). Existing files stop it
    (ConfigError naming them) unless `force`. Returns the files written."""
    recipe = find_recipe(name)
    dest = Path(dest)
    files = recipe.stage_files()
    targets = [dest / f.name for f in files] + [dest / RECIPE_FILE]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise ConfigError(f"would overwrite {', '.join(existing)}; pass --force to replace them")
    dest.mkdir(parents=True, exist_ok=True)
    for f, target in zip(files, targets):
        target.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    run_root = (dest / "runs").resolve()
    targets[-1].write_text(
        f"# Recipe {recipe.name} (`rlhf init {name} {dest}`): {recipe.method}.\n"
        "# run_root: the folder every stage of this recipe writes under (an absolute path: the same wherever the\n"
        "# commands run from). Change it to move the whole run.\n" + yaml.safe_dump({"run_root": str(run_root)}),
        encoding="utf-8",
    )
    return targets
