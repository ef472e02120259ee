"""A damaged checkpoint is refused in one line, never a traceback: by resume, `ckpt info` and `ckpt export`, from
the manifest of sizes and checksums in trainer_state.json; `resume=auto` passes over it to an older one.

One tiny run per checkpoint format is trained once; each case damages a copy. The refusals come before anything is
loaded, so most are checked in this process through `launcher.cli.main`; a few go through real processes.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, run_cli

from launcher import checkpoint, runlock
from launcher.checkpoint import integrity, retention
from launcher.cli import main
from launcher.preflight import preflight
from launcher.recipe import load_recipe

RUN = ["train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "eval.every_steps=null"]
FORMATS = {"ddp": [], "fsdp": ["strategy.name=fsdp"], "deepspeed": ["strategy.name=deepspeed"]}
NEWEST, OLDER = "step_00000004", "step_00000002"

DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[: len(data) // 2],
    "emptied": lambda data: b"",
    "overwritten": lambda data: bytes(b ^ 0xFF for b in data),  # other bytes, the same size
}
FILES = [
    ("ddp", "model.safetensors"),
    ("ddp", "optimizer.safetensors"),
    ("ddp", "scheduler.pt"),
    ("ddp", "rng.pt"),
    ("ddp", "trainer_state.json"),
    ("fsdp", "dcp/__0_0.distcp"),  # one process with FSDP still writes DCP shards
    ("deepspeed", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The run dir of a tiny one-process run in a format, trained on first use (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("damage")
    (root / "tiny.yaml").write_text(TINY_RECIPE)
    runs: dict[str, Path] = {}

    def run(fmt: str) -> Path:
        if fmt not in runs:
            proc = run_cli("train", "tiny.yaml", f"run_dir={fmt}", *RUN, *FORMATS[fmt], cwd=root)
            assert proc.returncode == 0, proc.stderr
            runs[fmt] = root / fmt
        return runs[fmt]

    return run


def copy_of(trained: Callable[[str], Path], fmt: str, tmp_path: Path) -> Path:
    """A run dir of its own, beside a recipe file."""
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    return Path(shutil.copytree(trained(fmt), tmp_path / "run"))


def damage(file: Path, how: str) -> None:
    file.write_bytes(DAMAGES[how](file.read_bytes()))


def strip_manifest(ckpt: Path) -> None:
    """Make it a checkpoint as written before manifests were."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state[integrity.MANIFEST_KEY]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def files_of(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run dir with its size and modification time (the run dir's lock aside)."""
    return {
        str(f.relative_to(run_dir)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in run_dir.rglob("*")
        if f.is_file() and not f.name.startswith(".lock")
    }


def train_args(run_dir: Path, fmt: str, *extra: str) -> list[str]:
    return ["train", str(run_dir.parent / "tiny.yaml"), f"run_dir={run_dir}", *RUN, *FORMATS[fmt], *extra]


def error_line(stderr: str) -> str:
    """The one line a refusal prints: no traceback, no second error."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------------- the manifest


def test_the_manifest_records_every_file_but_the_state(trained: Callable[[str], Path]):
    for fmt, shard in (("ddp", "model.safetensors"), ("fsdp", "dcp/.metadata"), ("deepspeed", "deepspeed/")):
        ckpt = trained(fmt) / "checkpoints" / NEWEST
        files = json.loads((ckpt / "trainer_state.json").read_text())[integrity.MANIFEST_KEY]
        on_disk = sorted(f.relative_to(ckpt).as_posix() for f in ckpt.rglob("*") if f.is_file())
        assert sorted(files) == [name for name in on_disk if name != "trainer_state.json"]
        assert any(name.startswith(shard) for name in files), files
        for name, entry in files.items():
            data = (ckpt / name).read_bytes()
            assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
        assert integrity.problems(ckpt) is None


def test_the_checksum_reads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = bytes(range(256)) * 41
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 1000)  # many chunks, the last one short
    assert integrity.crc32(tmp_path / "f") == f"{zlib.crc32(data):08x}"


def test_what_problems_names(tmp_path: Path):
    ckpt = tmp_path / "step_00000010"
    (ckpt / "dcp").mkdir(parents=True)
    (ckpt / "dcp" / "shard").write_bytes(b"0123456789")
    (ckpt / "rng.pt").write_bytes(b"abc")

    def state(value: object) -> None:
        (ckpt / "trainer_state.json").write_text(value if isinstance(value, str) else json.dumps(value))

    state({"step": 10, "files": integrity.manifest(ckpt)})
    assert integrity.problems(ckpt) is None
    (ckpt / "dcp" / "shard").write_bytes(b"0123456788")
    assert integrity.problems(ckpt).startswith("dcp/shard: checksum differs (crc32 ")
    (ckpt / "rng.pt").write_bytes(b"ab")
    assert integrity.problems(ckpt) == "rng.pt: size 2 bytes, expected 3"  # sizes are compared before any checksum
    (ckpt / "rng.pt").unlink()
    assert integrity.problems(ckpt) == "rng.pt: missing"
    state({"step": 10})  # written before manifests: the files' structure is checked instead
    assert integrity.problems(ckpt) == "dcp/.metadata: missing"
    shutil.rmtree(ckpt / "dcp")
    assert integrity.problems(ckpt) is None  # rng.pt is gone: only the files there are checked
    state('{"step": 1')
    assert integrity.problems(ckpt).startswith("trainer_state.json: not JSON (JSONDecodeError: ")
    state([10])
    assert integrity.problems(ckpt) == "trainer_state.json: not a JSON object"
    state({"epoch": 1})
    assert integrity.problems(ckpt) == "trainer_state.json: has no step"
    state({"step": 10, "files": {"../elsewhere": {"size": 1, "crc32": "00000000"}}})
    assert integrity.problems(ckpt) == "trainer_state.json: files: not a manifest of files, sizes and checksums"
    (ckpt / "trainer_state.json").unlink()
    assert integrity.problems(ckpt) == "trainer_state.json: missing"


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("how", list(DAMAGES))
@pytest.mark.parametrize("fmt, file", FILES)
def test_a_damaged_checkpoint_is_refused_in_one_line(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, file: str, how: str
):
    run_dir = copy_of(trained, fmt, tmp_path)
    ckpt = run_dir / "checkpoints" / NEWEST
    damage(ckpt / file, how)
    before = files_of(run_dir)
    out = tmp_path / "weights.safetensors"
    capsys.readouterr()
    for argv in (
        ["ckpt", "info", str(ckpt)],
        ["ckpt", "export", str(ckpt), "--out", str(out)],
        train_args(run_dir, fmt, f"resume={ckpt}"),
    ):
        assert main(argv) == 2, argv
        stdout, stderr = capsys.readouterr()
        assert f"{ckpt}: damaged: {file}: " in error_line(stderr), (argv, stderr)
        assert stdout == ""
    assert not out.exists()
    assert files_of(run_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt, file, how",
    [
        ("ddp", "model.safetensors", "truncated"),
        ("fsdp", "dcp/__0_0.distcp", "overwritten"),
        ("deepspeed", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "emptied"),
    ],
)
def test_a_real_resume_refuses_a_damaged_checkpoint(
    trained: Callable[[str], Path], tmp_path: Path, fmt: str, file: str, how: str
):
    run_dir = copy_of(trained, fmt, tmp_path)
    ckpt = run_dir / "checkpoints" / NEWEST
    damage(ckpt / file, how)
    before = files_of(run_dir)
    proc = run_cli(*train_args(run_dir, fmt, f"resume={ckpt}"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'tiny.yaml'}: resume: {ckpt}: damaged: {file}: "), line
    assert files_of(run_dir) == before
    if fmt == "ddp":  # the export command refuses alike in every format (checked in this process above)
        export = run_cli("ckpt", "export", str(ckpt), "--out", str(tmp_path / "w.safetensors"))
        assert export.returncode == 2
        (line,) = export.stderr.strip().splitlines()
        assert line.startswith(f"error: {ckpt}: damaged: {file}: size "), line
        assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.slow
def test_resume_auto_passes_over_a_damaged_checkpoint_to_an_older_one(trained: Callable[[str], Path], tmp_path: Path):
    run_dir = copy_of(trained, "ddp", tmp_path)
    newest, older = run_dir / "checkpoints" / NEWEST, run_dir / "checkpoints" / OLDER
    damage(newest / "model.safetensors", "overwritten")
    strip_manifest(older)  # and the older one was written before manifests: still resumed from
    proc = run_cli(*train_args(run_dir, "ddp", "train.max_steps=6", "resume=auto"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: passing over {newest}: damaged: model.safetensors: checksum differs (crc32 " in proc.stderr
    assert f"resumed from {older} at step 2" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert integrity.problems(newest) is None  # saved again at step 4, whole this time


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir = copy_of(trained, "ddp", tmp_path)
    for name in (NEWEST, OLDER):
        damage(run_dir / "checkpoints" / name / "rng.pt", "emptied")
    assert checkpoint.latest_intact(run_dir / "checkpoints")[0] is None
    capsys.readouterr()
    assert main(train_args(run_dir, "ddp", "train.max_steps=6", "resume=auto")) == 2
    stderr = capsys.readouterr().err
    assert f"warning: passing over {run_dir / 'checkpoints' / OLDER}: damaged: rng.pt: size 0 bytes" in stderr
    assert "is damaged, the newest: " in error_line(stderr)


# ---------------------------------------------------------------------------------------------------- ckpt info


def test_info_lists_damaged_and_interrupted_checkpoints(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir = copy_of(trained, "ddp", tmp_path)
    ckpts = run_dir / "checkpoints"
    damage(ckpts / NEWEST / "scheduler.pt", "truncated")
    # A crash just before the final rename leaves a temporary dir that holds a trainer state.
    interrupted = Path(shutil.copytree(ckpts / OLDER, ckpts / ".tmp-step_00000006"))
    capsys.readouterr()
    assert main(["ckpt", "info", str(run_dir)]) == 2
    stdout, stderr = capsys.readouterr()
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"{interrupted}: incomplete (an interrupted save; resume ignores it), ")
    assert lines[1].startswith(f"{ckpts / OLDER}: step 2, ") and lines[1].endswith(", complete")
    assert lines[2].startswith(f"{ckpts / NEWEST}: damaged: scheduler.pt: size ")
    assert error_line(stderr) == f"error: {ckpts}: 1 of 3 checkpoints damaged"

    assert main(["ckpt", "info", str(interrupted)]) == 0
    assert "incomplete (an interrupted save" in capsys.readouterr().out
    assert main(train_args(run_dir, "ddp", f"resume={interrupted}")) == 2
    assert "is not a complete checkpoint (a save interrupted before its rename)" in error_line(capsys.readouterr().err)


def test_a_checkpoint_written_before_manifests_is_still_accepted(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir = copy_of(trained, "ddp", tmp_path)
    ckpt = run_dir / "checkpoints" / NEWEST
    strip_manifest(ckpt)
    assert integrity.problems(ckpt) is None
    assert checkpoint.latest_intact(run_dir / "checkpoints") == (ckpt, [])
    capsys.readouterr()
    assert main(["ckpt", "info", str(ckpt)]) == 0
    assert capsys.readouterr().out.startswith(f"{ckpt}: step 4, ")


# ---------------------------------------------------------------------------------------------------- no manifest


@pytest.mark.parametrize(
    "fmt, file, how",
    [
        ("ddp", "model.safetensors", "overwritten"),
        ("fsdp", "dcp/__0_0.distcp", "truncated"),
        ("fsdp", "dcp/.metadata", "emptied"),
        ("deepspeed", "deepspeed/mp_rank_00_model_states.pt", "truncated"),
    ],
)
def test_export_names_a_damaged_file_without_a_manifest(
    trained: Callable[[str], Path], tmp_path: Path, fmt: str, file: str, how: str
):
    run_dir = copy_of(trained, fmt, tmp_path)
    ckpt = run_dir / "checkpoints" / NEWEST
    strip_manifest(ckpt)
    damage(ckpt / file, how)
    with pytest.raises(integrity.Damaged) as raised:
        checkpoint.export(ckpt, tmp_path / "w.safetensors")
    assert raised.value.file == file and "\n" not in str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt, file, how, says",
    [
        ("ddp", "rng.pt", "truncated", "rng.pt: size "),
        ("ddp", "scheduler.pt", "overwritten", "scheduler.pt: not a file torch.save writes"),
        ("fsdp", "dcp/__0_0.distcp", "truncated", "dcp/__0_0.distcp: size "),
        ("deepspeed", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "emptied", "deepspeed/zero_pp_rank_0_"),
    ],
)
def test_resuming_names_a_damaged_file_without_a_manifest(
    trained: Callable[[str], Path], tmp_path: Path, fmt: str, file: str, how: str, says: str
):
    run_dir = copy_of(trained, fmt, tmp_path)
    ckpt = run_dir / "checkpoints" / NEWEST
    strip_manifest(ckpt)
    damage(ckpt / file, how)
    proc = run_cli(*train_args(run_dir, fmt, f"resume={ckpt}"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    # Found by the files' structure before anything loads.
    assert error_line(proc.stderr).startswith(f"error: {tmp_path / 'tiny.yaml'}: resume: {ckpt}: damaged: {says}")


NO_MANIFEST_DAMAGES = [
    ("ddp", "model.safetensors", "truncated", "model.safetensors: size "),
    ("ddp", "model.safetensors", "overwritten", "model.safetensors: size 1"),  # its header claims a huge size
    ("ddp", "optimizer.safetensors", "emptied", "optimizer.safetensors: size 0 bytes"),
    ("ddp", "rng.pt", "truncated", "rng.pt: size "),
    ("ddp", "scheduler.pt", "emptied", "scheduler.pt: size 0 bytes (empty)"),
    ("fsdp", "dcp/__0_0.distcp", "truncated", "dcp/__0_0.distcp: size "),
    ("fsdp", "dcp/.metadata", "truncated", "dcp/.metadata: "),
    ("deepspeed", "deepspeed/mp_rank_00_model_states.pt", "truncated", "deepspeed/mp_rank_00_model_states.pt: size "),
]


@pytest.mark.parametrize("fmt, file, how, says", NO_MANIFEST_DAMAGES)
def test_a_cut_file_without_a_manifest_reads_as_damaged(
    trained: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
    file: str,
    how: str,
    says: str,
):
    run_dir = copy_of(trained, fmt, tmp_path)
    ckpts = run_dir / "checkpoints"
    ckpt = ckpts / NEWEST
    strip_manifest(ckpt)
    damage(ckpt / file, how)
    problem = integrity.problems(ckpt)
    assert problem is not None and problem.startswith(says), problem
    found, passed_over = checkpoint.latest_intact(ckpts)
    assert (found, passed_over) == (ckpts / OLDER, [f"{ckpt}: damaged: {problem}"])
    capsys.readouterr()
    assert main(["ckpt", "info", str(run_dir)]) == 2
    stdout, stderr = capsys.readouterr()
    assert f"{ckpt}: damaged: {says}" in stdout
    assert error_line(stderr) == f"error: {ckpts}: 1 of 2 checkpoints damaged"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_an_intact_checkpoint_without_a_manifest_passes_the_structure_checks(
    trained: Callable[[str], Path], tmp_path: Path, fmt: str
):
    run_dir = copy_of(trained, fmt, tmp_path)
    for name in (NEWEST, OLDER):
        strip_manifest(run_dir / "checkpoints" / name)
        assert integrity.problems(run_dir / "checkpoints" / name) is None


@pytest.mark.slow
def test_resume_auto_passes_over_a_cut_file_without_a_manifest(trained: Callable[[str], Path], tmp_path: Path):
    run_dir = copy_of(trained, "ddp", tmp_path)
    newest, older = run_dir / "checkpoints" / NEWEST, run_dir / "checkpoints" / OLDER
    for ckpt in (newest, older):
        strip_manifest(ckpt)
    damage(newest / "model.safetensors", "truncated")
    proc = run_cli(*train_args(run_dir, "ddp", "train.max_steps=6", "resume=auto"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: passing over {newest}: damaged: model.safetensors: size " in proc.stderr
    assert f"resumed from {older} at step 2" in proc.stdout
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------- export


def test_export_of_a_damaged_checkpoint_names_the_newest_intact_one(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir = copy_of(trained, "ddp", tmp_path)
    ckpts = run_dir / "checkpoints"
    damage(ckpts / NEWEST / "model.safetensors", "overwritten")
    out = tmp_path / "w.safetensors"
    capsys.readouterr()
    assert main(["ckpt", "export", str(ckpts / "latest"), "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {ckpts / NEWEST}: damaged: model.safetensors: checksum differs"), line
    assert line.endswith(f"; the newest intact checkpoint is {ckpts / OLDER}: export that one instead"), line
    assert not out.exists()

    damage(ckpts / OLDER / "rng.pt", "emptied")  # none intact: nothing to suggest
    assert main(["ckpt", "export", str(ckpts / "latest"), "--out", str(out)]) == 2
    assert "newest intact" not in error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------- retention


def test_a_kill_during_retention_leaves_no_damaged_checkpoint(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    run_dir = copy_of(trained, "ddp", tmp_path)
    ckpts = run_dir / "checkpoints"

    def killed(path: Path, ignore_errors: bool = False) -> None:
        (Path(path) / "model.safetensors").unlink()  # a file or two gone, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(retention.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(ckpts, keep_last=1)
    monkeypatch.undo()
    doomed = ckpts / f".pruned-{OLDER}"
    assert sorted(p.name for p in ckpts.iterdir()) == [doomed.name, NEWEST]
    assert checkpoint.latest_intact(ckpts) == (ckpts / NEWEST, [])
    capsys.readouterr()
    assert main(["ckpt", "info", str(run_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"{ckpts / NEWEST}: step 4, ")
    main(["ckpt", "info", str(doomed)])  # named directly: no longer a checkpoint (or an incomplete one), not damaged
    assert "damaged" not in "".join(capsys.readouterr())

    # The next start finishes the deletion, before anything else, and says nothing of it.
    recipe = load_recipe(tmp_path / "tiny.yaml", [f"run_dir={run_dir}", *RUN, "resume=auto"])
    start = preflight(recipe, {})
    runlock.release(start.lock)
    assert start.resume_from == ckpts / NEWEST
    assert sorted(p.name for p in ckpts.iterdir()) == [NEWEST]
    assert capsys.readouterr().err == ""


def test_retention_renames_before_it_deletes(trained: Callable[[str], Path], tmp_path: Path):
    run_dir = copy_of(trained, "ddp", tmp_path)
    ckpts = run_dir / "checkpoints"
    (ckpts / ".pruned-step_00000001").mkdir()  # left by an earlier kill: removed too
    checkpoint.prune(ckpts, keep_last=1)
    assert sorted(p.name for p in ckpts.iterdir()) == [NEWEST]
