"""Malformed recipes and overrides are refused by the CLI: exit 2, one `error: <file>: <key>: ...` line per problem,
no traceback, and nothing written.

Each `tests/malformed/*.yaml` is one case (files in subfolders are only pulled in through `base:`). Its leading
comment lines `# expect: <text>` name what the error must say: the first one is the key path (or, for YAML syntax
errors, the line), the others are further text. Every case runs through both `validate` and `train`, each in this
process (`launcher.cli.main`, as the installed command calls it: a refusal comes before torch or Accelerate is set
up), in an empty temporary folder as its working directory, with `run_dir=` pointing inside that folder (a
subprocess per case took a second or two each; tests/test_hf.py's refusals go through the real command).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import cli_in_process, run_cli

TESTS = Path(__file__).resolve().parent
CASES_DIR = TESTS / "malformed"
QUICKSTART = TESTS.parent / "recipes" / "quickstart.yaml"
VERBS = ("validate", "train")


# ---------------------------------------------------------------------------------------------------- running the CLI


@dataclass(frozen=True)
class Job:
    """One CLI call: `verb` on a recipe file, or on `text` written to a fresh folder as the recipe."""

    verb: str
    recipe: Path | None = None
    text: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    recipe: str  # the recipe path as given on the command line
    returncode: int
    stdout: str
    stderr: str
    created: tuple[str, ...]  # everything found afterwards in the (initially empty) working directory

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def run_job(job: Job, root: Path) -> Result:
    cwd = Path(tempfile.mkdtemp(prefix=f"{job.verb}-", dir=root))
    recipe = job.recipe
    if job.text is not None:
        recipe = Path(tempfile.mkdtemp(prefix="recipe-", dir=root)) / "recipe.yaml"
        recipe.write_text(job.text)
    assert recipe is not None
    args = [job.verb, str(recipe), *job.overrides]
    if job.verb == "train":
        args.append(f"run_dir={cwd / 'run'}")
    code, out, err = cli_in_process(args, cwd)
    created = tuple(sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")))
    return Result(str(recipe), code, out, err, created)


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory):
    """`cli(job) -> Result`, each job run once and its result kept for every test that asks for it."""
    root = tmp_path_factory.mktemp("cli")
    results: dict[Job, Result] = {}

    def get(job: Job) -> Result:
        if job not in results:
            results[job] = run_job(job, root)
        return results[job]

    return get


def assert_rejected_cleanly(result: Result) -> None:
    """Exit 2, only `error: <recipe>: ...` lines on stderr, no traceback, nothing written."""
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == 2, output
    assert result.lines, output
    for line in result.lines:
        assert line.startswith("error: "), f"stderr line without 'error: ': {line!r}\n{output}"
        assert result.recipe in line, f"stderr line does not name {result.recipe}: {line!r}\n{output}"
    assert result.created == (), f"files were created: {result.created}\n{output}"


def mentions(text: str, expected: str) -> bool:
    """`expected` appears in `text` as a whole key path: not as part of a longer name (`train` in `data.train`)."""
    return re.search(rf"(?<![\w.]){re.escape(expected)}(?![\w])", text) is not None


# ---------------------------------------------------------------------------------------------------- case files


def expectations(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("# expect: "), f"{path}: the first line must be '# expect: <key path>'"
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        if line.startswith("# expect: "):
            out.append(line.removeprefix("# expect: ").strip())
    return out


CASES = sorted(CASES_DIR.glob("*.yaml"))


def case_params() -> list:
    return [pytest.param(Job(verb, recipe=path), id=f"{verb}-{path.stem}") for path in CASES for verb in VERBS]


def test_enough_cases():
    assert len(CASES) >= 22
    for path in CASES:
        expectations(path)


@pytest.mark.parametrize("job", case_params())
def test_case_rejected_cleanly(cli, job: Job):
    assert_rejected_cleanly(cli(job))


@pytest.mark.parametrize("job", case_params())
def test_case_error_names_key(cli, job: Job):
    result = cli(job)
    assert job.recipe is not None
    text = result.stderr.replace(result.recipe, "<recipe>")  # the case's own file name must not count as a match
    for expected in expectations(job.recipe):
        assert mentions(text, expected), f"{expected!r} not in the error output:\n{result.stderr}"


# ---------------------------------------------------------------------------------------------------- several problems


SEVERAL_PROBLEMS = f"""\
base: {QUICKSTART}
optimizer:
  lr: -1
train:
  batchsize: 8
  clip_grad_norm: 0
checkpoint:
  keep_last: 0
early_stopping:
  patience: -2
logging:
  trackers: [jsonl, nope]
"""


@pytest.mark.parametrize("job", [pytest.param(Job(v, text=SEVERAL_PROBLEMS), id=v) for v in VERBS])
def test_several_problems_reported_together(cli, job: Job):
    result = cli(job)
    assert_rejected_cleanly(result)
    keys = [
        "optimizer.lr",
        "train.batchsize",
        "train.clip_grad_norm",
        "checkpoint.keep_last",
        "early_stopping.patience",
        "logging.trackers",
    ]
    assert len(result.lines) == len(keys), result.stderr
    for key in keys:
        assert sum(mentions(line, key) for line in result.lines) == 1, f"{key}:\n{result.stderr}"


TYPE_AND_RANGE_PROBLEMS = f"""\
base: {QUICKSTART}
optimizer:
  lr: -1
train:
  batch_size: many
"""


def test_type_and_range_problems_reported_together(cli):
    result = cli(Job("validate", text=TYPE_AND_RANGE_PROBLEMS))
    assert_rejected_cleanly(result)
    assert any(mentions(line, "train.batch_size") for line in result.lines), result.stderr
    assert any(mentions(line, "optimizer.lr") for line in result.lines), result.stderr


# ---------------------------------------------------------------------------------------------------- overrides

BAD_OVERRIDES = [
    ("notakeyvalue", "notakeyvalue"),
    ("a..b=1", "a..b"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size.x=1", "train.batch_size"),
    ("optimizer.lr=[", "optimizer.lr"),
    ("train.batch_size=1e30", "train.batch_size: expected an integer"),
    ("train.batch_size=1000000000000000000000000000000", "train.batch_size: expected an integer that fits 64 bits"),
    ("train.seed=1180591620717411303424", "train.seed"),
    ("train.seed=4294967296", "train.seed: must be in [0, 2**32)"),
    ("optimizer._component_=lbfgs", "optimizer._component_: lbfgs's step needs a closure"),
    ("model._component_=-1", "model._component_: expected a string (a short name or a dotted path), got a number"),
    ("model._componnt_=mlp", "model._componnt_: unknown key (did you mean '_component_'?)"),
    ("early_stopping.monitor=val/acc", "(it has: val/accuracy, val/loss)"),
    ("model.num_classes=0", "model.num_classes"),
    ("data.train.split=", "data.train.split"),
    ("base=missing.yaml", "base: no such recipe file"),  # the command line's base replaces the recipe's
    ("base.x=1", "base"),
    ("~no.such_key", "no.such_key: no such key"),
    ("~train.batch_size=8", "~train.batch_size=8"),
    ("train.max_epochs=abc", "train.max_epochs"),  # and no second line saying the run has no length
]


@pytest.mark.parametrize(
    ("job", "key"),
    [
        pytest.param(Job(verb, recipe=QUICKSTART, overrides=(item,)), key, id=f"{verb}-{item}")
        for item, key in BAD_OVERRIDES
        for verb in VERBS
    ],
)
def test_malformed_override(cli, job: Job, key: str):
    result = cli(job)
    assert_rejected_cleanly(result)
    assert len(result.lines) == 1, result.stderr
    assert key in result.lines[0], result.stderr


# ---------------------------------------------------------------------------------------------------- found on the way


@pytest.mark.parametrize(
    "job",
    [
        pytest.param(Job("validate", recipe=QUICKSTART, overrides=("train.mixed_precision=no",)), id="override"),
        pytest.param(Job("validate", text=f"base: {QUICKSTART}\ntrain:\n  mixed_precision: no\n"), id="recipe"),
    ],
)
def test_mixed_precision_no_is_accepted(cli, job: Job):
    result = cli(job)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("job", "shown"),
    [
        pytest.param(
            Job("validate", recipe=QUICKSTART, overrides=("logging.trackers=[1]",)),
            "logging.trackers: expected a list of names, got a list ([1])",
            id="trackers-list-of-numbers",
        ),
        pytest.param(
            Job("validate", recipe=QUICKSTART, overrides=("data.shuffle=[true]",)),
            "data.shuffle: expected true or false, got a list ([true])",
            id="values-shown-as-yaml",
        ),
    ],
)
def test_message_wording(cli, job: Job, shown: str):
    """A wrong value is shown as the user wrote it, in YAML, with what kind of value it is."""
    result = cli(job)
    assert_rejected_cleanly(result)
    assert shown in result.stderr, result.stderr


@pytest.mark.parametrize(
    "job",
    [
        pytest.param(
            Job("validate", recipe=QUICKSTART, overrides=("~early_stopping", "~scheduler.warmup_steps")), id="remove"
        ),
        pytest.param(Job("validate", recipe=QUICKSTART, overrides=("~base",)), id="remove-base"),
        pytest.param(Job("validate", recipe=CASES_DIR / "lr_zero.yaml", overrides=("optimizer.lr=0.1",)), id="fixed"),
    ],
)
def test_overrides_that_remove_keys_are_accepted(cli, job: Job):
    result = cli(job)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------- this machine

FP16 = "train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: fp16 is fine here")
@pytest.mark.parametrize(
    "job", [pytest.param(Job(v, recipe=QUICKSTART, overrides=("train.mixed_precision=fp16",)), id=v) for v in VERBS]
)
def test_fp16_without_a_gpu_is_refused_by_both(cli, job: Job):
    result = cli(job)
    assert_rejected_cleanly(result)
    assert result.lines == [f"error: {QUICKSTART}: {FP16}"], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: fp16 is fine here")
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["plan", str(QUICKSTART)], id="plan"),
        pytest.param(["slurm", "submit", str(QUICKSTART), "--gpus-per-node", "8", "--dry-run"], id="slurm-submit"),
    ],
)
def test_fp16_is_for_the_machine_that_trains(args: list[str], tmp_path: Path):
    """A plan, or a job submitted from a login node without GPUs, is for other machines: fp16 is theirs to run;
    and so is memory (a model larger than this machine's)."""
    big_model = "model.hidden_sizes=[100000, 100000]"  # 10**10 parameters: 40 GB in fp32
    proc = run_cli(*args, "train.mixed_precision=fp16", big_model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []
