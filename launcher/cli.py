"""Argument parsing only: each verb calls one function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from launcher.errors import RecipeError, RunFailed

EXIT_BAD_INPUT = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher", description="Train PyTorch models from YAML recipes.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="train a recipe (under `accelerate launch` for several processes)")
    _recipe_args(train)
    train.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")

    validate = verbs.add_parser("validate", help="check a recipe without training")
    _recipe_args(validate)

    args = parser.parse_args(argv)
    try:
        if args.verb == "train":
            return train_command(args.recipe, args.overrides, args.print_recipe)
        return validate_command(args.recipe, args.overrides)
    except RecipeError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as e:
        if e.message:
            print(e.message, file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as optimizer.lr=1e-3")


def validate_command(path: str, overrides: Sequence[str]) -> int:
    from launcher.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    print(f"{path}: ok ({recipe.name}, run dir {recipe.run_dir})")
    return 0


def train_command(path: str, overrides: Sequence[str], print_recipe: bool) -> int:
    from launcher.recipe import dump, load_recipe

    recipe = load_recipe(path, overrides)
    if print_recipe:
        print(dump(recipe), end="")
        return 0

    from launcher import loop  # torch and accelerate load only once the recipe is known to be good

    try:
        resume_from = loop.preflight(recipe, os.environ)
        loop.run(recipe, resume_from)
    except RecipeError as e:
        raise RecipeError([f"{path}: {p}" for p in e.problems]) from None
    return 0
