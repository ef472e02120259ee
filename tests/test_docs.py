"""The docs hold to the product: the recipe reference in docs/recipes.md lists exactly the keys the schema takes, every
relative link in README.md and docs/ leads to a file (and heading) that exists, and the README keeps the quick start
that users copy and CI runs. Reads files only; starts no process.

The reference's convention: under the heading `## Reference of recipe keys` of docs/recipes.md (up to the next `## `
heading), every Markdown table row other than a header (`| key | ...`) or a separator (`| --- | ...`) documents one
key, its first cell being that key's dotted path in backticks: | `train.batch_size` | integer >= 1 | `32` | ... |
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import types
import typing
from pathlib import Path

from launcher.param_groups import KEYS as OPTIMIZER_OWN_KEYS
from launcher.recipe import Recipe
from launcher.schedules import WARMUP_KEYS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RECIPES_DOC = REPO / "docs" / "recipes.md"
REFERENCE_HEADING = "## Reference of recipe keys"
KEY_ROW = re.compile(r"^\|\s*`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)`\s*\|")

# Keys the loader takes before the schema sees the recipe: `base` (composition, see launcher.recipe.compose) and
# `data.dataset` (arguments shared by data.train and data.val, folded into them). They are documented like the rest.
LOADER_KEYS = {"base", "data.dataset"}
# Keys of the optimizer section the launcher takes itself (its parameter groups) instead of passing them on, and
# those of a built-in schedule (its warm-up).
LAUNCHER_KEYS = {f"optimizer.{key}" for key in OPTIMIZER_OWN_KEYS} | {f"scheduler.{key}" for key in WARMUP_KEYS}
# The component type (launcher.components.Component), taken from the schema itself so that it follows the code.
COMPONENT = typing.get_type_hints(Recipe)["model"]
# Component keys hold a class and its arguments, which are not recipe keys; data.train and data.val are components.
COMPONENT_KEYS = {"data.train", "data.val"}

QUICK_START_MAIN = "pip install torch==2.13.0 -e . && launcher train recipes/quickstart.yaml"
QUICK_START_TESTS = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest'
README_MAX_BYTES = 12 * 1024


# ---------------------------------------------------------------------------------------------------- the schema


def _members(tp: typing.Any) -> list[typing.Any]:
    """The types of a field, `X | None` unwrapped."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [arg for arg in typing.get_args(tp) if arg is not type(None)]
    return [tp]


def schema_keys(cls: type = Recipe, prefix: str = "") -> set[str]:
    """Every key the schema takes, as dotted paths: sections, their fields, and component keys (not their
    arguments)."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        keys.add(key)
        members = _members(hints[field.name])
        if key in COMPONENT_KEYS or any(isinstance(m, type) and issubclass(m, COMPONENT) for m in members):
            continue
        for member in members:
            if dataclasses.is_dataclass(member):
                keys |= schema_keys(member, key + ".")
    return keys


def test_schema_walk_finds_sections_fields_and_components():
    keys = schema_keys()
    assert {"train", "train.batch_size", "strategy.fsdp", "strategy.fsdp.wrap", "early_stopping.patience"} <= keys
    assert {"model", "data.train", "data.val", "loss", "optimizer", "scheduler"} <= keys
    assert not any(key.startswith(("model.", "data.train.", "optimizer.")) for key in keys), sorted(keys)


# ---------------------------------------------------------------------------------------------------- the reference


def reference_rows(text: str) -> tuple[list[str], list[str]]:
    """The keys the reference documents, in order, and the table rows under it that do not follow the convention."""
    lines = text.splitlines()
    assert REFERENCE_HEADING in lines, f"{RECIPES_DOC}: no '{REFERENCE_HEADING}' heading"
    keys, malformed = [], []
    for line in lines[lines.index(REFERENCE_HEADING) + 1 :]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "key" or all(set(cell) <= set("-: ") for cell in cells):
            continue
        match = KEY_ROW.match(line)
        if match:
            keys.append(match.group(1))
        else:
            malformed.append(line)
    return keys, malformed


def documented_keys() -> list[str]:
    keys, malformed = reference_rows(RECIPES_DOC.read_text())
    assert not malformed, f"rows of the reference that do not start with a `dotted.key` cell: {malformed}"
    assert keys, "the reference documents no key"
    return keys


def test_reference_documents_each_key_once():
    keys = documented_keys()
    assert sorted({key for key in keys if keys.count(key) > 1}) == []


def test_every_documented_key_is_in_the_schema():
    unknown = set(documented_keys()) - schema_keys() - LOADER_KEYS - LAUNCHER_KEYS
    assert not unknown, f"docs/recipes.md documents keys the schema does not take: {sorted(unknown)}"


def test_every_schema_key_is_documented():
    missing = (schema_keys() | LOADER_KEYS | LAUNCHER_KEYS) - set(documented_keys())
    assert not missing, f"docs/recipes.md's reference lacks these recipe keys: {sorted(missing)}"


def test_reference_parser_sees_additions_and_removals():
    text = RECIPES_DOC.read_text()
    row = "| `train.batch_size` |"
    assert row in text
    assert "train.batch_size" not in reference_rows(text.replace(row, "| `train.bogus_size` |"))[0]
    assert "train.bogus_size" in reference_rows(text.replace(row, "| `train.bogus_size` |"))[0]
    assert reference_rows(text.replace(row, "| train.batch_size |"))[1], "a row without backticks goes unnoticed"


# ---------------------------------------------------------------------------------------------------- links


def _pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no such heading in {file.name}")
    return broken


def test_relative_links_lead_to_files_that_exist():
    broken = {page.name: found for page in _pages() if (found := broken_links(page))}
    assert not broken, broken


def test_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n[ok](#page) [gone](missing.md) [url](https://example.org) `[code](nothing.md)`\n")
    assert broken_links(page) == ["missing.md: no such file"]


# ---------------------------------------------------------------------------------------------------- the README


def quick_start_commands() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Quick start\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_quick_start_keeps_its_two_commands():
    assert quick_start_commands() == [QUICK_START_MAIN, QUICK_START_TESTS]
    recipe = QUICK_START_MAIN.split()[-1]
    assert (REPO / recipe).is_file(), recipe


def test_ci_runs_the_readme_test_command():
    """.ci/run installs and runs the README's test command: its install arguments and its pytest line."""
    install, _, run = QUICK_START_TESTS.partition(" && ")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert run in [line.strip() for line in ci], f".ci/run does not run '{run}'"
    pip_lines = [shlex.split(line.split("||")[0]) for line in ci if line.strip().startswith("pip install")]
    assert any(set(shlex.split(install)) <= set(words) for words in pip_lines), pip_lines


def test_readme_stays_a_landing_page():
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move reference material into docs/"
