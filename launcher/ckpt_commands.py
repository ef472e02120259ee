"""`launcher ckpt info` and `launcher ckpt export`: checkpoints on disk, or in object storage (downloaded first)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from launcher.errors import RecipeError
from launcher.layout import (
    CHECKPOINT_PREFIXES,
    CHECKPOINTS_DIR,
    DCP_DIR,
    DEEPSPEED_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    is_url,
)


def quiet_deepspeed() -> None:
    """Accelerate imports DeepSpeed where it is installed, which then warns on CPU machines that it guessed the CPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def ckpt_info_command(path_text: str) -> int:
    from launcher import checkpoint

    if is_url(path_text):
        return _store_info(path_text)
    path = checkpoint.resolve(Path(path_text))
    if not path.is_dir():
        raise RecipeError(f"{path_text}: no such checkpoint, checkpoints folder or run dir")
    if (path / CHECKPOINTS_DIR).is_dir():
        path = path / CHECKPOINTS_DIR
    one = _is_one_checkpoint(path)
    dirs = [path] if one else _checkpoint_dirs(path)
    if not dirs:
        raise RecipeError(f"{path_text}: holds no checkpoint")
    infos = [checkpoint.summary(d) for d in dirs]
    if one and infos[0]["problem"]:
        raise RecipeError(f"{path}: damaged: {infos[0]['problem']}")
    return _show(infos, str(path))


def _checkpoint_dirs(folder: Path) -> list[Path]:
    """The checkpoints in a folder of them, and the saves a crash interrupted there."""
    return [c for c in sorted(folder.iterdir()) if c.is_dir() and c.name.startswith(CHECKPOINT_PREFIXES)]


def _is_one_checkpoint(path: Path) -> bool:
    """A checkpoint (complete, damaged or interrupted), not a folder of them."""
    held = (STATE_FILE, WEIGHTS_FILE, DCP_DIR, DEEPSPEED_DIR)
    return path.name.startswith(CHECKPOINT_PREFIXES) or any((path / name).exists() for name in held)


def ckpt_export_command(
    path_text: str,
    out_text: str,
    force: bool,
    fmt: str = "safetensors",
    max_shard_size: str = "5GB",
    merge: bool = False,
    shown: str | None = None,
) -> int:
    """`shown`: what the checkpoint is called in the line that says it was exported (its URL, once downloaded)."""
    from launcher import checkpoint
    from launcher.checkpoint import integrity

    if is_url(path_text):
        return _store_export(path_text, out_text, force, fmt, max_shard_size, merge)
    path, out = checkpoint.resolve(Path(path_text)), Path(out_text)
    if not checkpoint.is_complete(path):
        raise RecipeError(f"{path_text}: not a complete checkpoint (no {checkpoint.STATE_FILE})")
    if checkpoint.interrupted(path):
        raise RecipeError(f"{path_text}: not a complete checkpoint (a save interrupted before its final rename)")
    _check_out(out, force)
    problem = integrity.problems(path)  # before anything is read into torch or written
    if problem:
        raise RecipeError(f"{path}: damaged: {problem}{_intact_instead(path)}")
    quiet_deepspeed()
    from launcher.checkpoint.shards import UnsafeCheckpoint

    try:
        count = checkpoint.export(path, out, fmt, max_shard_size, merge)
    except checkpoint.NotHuggingFace as e:
        raise RecipeError(f"{path_text}: {e}") from None
    except UnsafeCheckpoint as e:
        raise RecipeError(e.refusal(f"{path_text}:")) from None
    except integrity.Damaged as e:  # written before manifests, and damaged since
        raise RecipeError(f"{path}: {e}{_intact_instead(path)}") from None
    print(f"{out}: {count} tensors from {shown or path}")
    return 0


def _show(infos: list[dict], where: str) -> int:
    """One line per checkpoint; a damaged one makes the command fail, after all are shown."""
    from launcher import checkpoint

    for info in infos:
        print(checkpoint.describe(info))
    damaged = sum(1 for info in infos if info["problem"])
    if damaged:
        raise RecipeError(f"{where}: {damaged} of {len(infos)} checkpoints damaged")
    return 0


def _check_out(out: Path, force: bool) -> None:
    """Refuse an `--out` export cannot write, before anything is read or downloaded."""
    if out.exists() and not force:
        raise RecipeError(f"--out: {out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise RecipeError(f"--out: no such folder: {out.parent}")


def _intact_instead(damaged: Path) -> str:
    """Where a damaged checkpoint is refused for export, the newest intact one beside it, which the user can export
    instead (typically the one before it, when `latest` is damaged)."""
    from launcher import checkpoint

    found = checkpoint.latest_intact(damaged.parent)[0]
    if found is None or found == damaged:
        return ""
    return f"; the newest intact checkpoint is {found}: export that one instead"


def _store_info(url: str) -> int:
    """The checkpoints under a storage URL (or the one it names), from their trainer states and listed sizes."""
    from launcher.checkpoint import remote

    try:
        store, steps, one = remote.locate(url)
        infos = [remote.summary(store, step) for step in steps]
    except remote.NotFound as e:
        raise RecipeError(str(e)) from None
    except OSError as e:
        raise RecipeError(f"{url}: cannot read it: {e}") from None
    if not infos or (one and not infos[0]["files"]):
        raise RecipeError(f"{url}: holds no checkpoint")
    return _show(infos, url)


def _store_export(url: str, out_text: str, force: bool, fmt: str, max_shard_size: str, merge: bool) -> int:
    """Download the checkpoint a storage URL names next to `--out` (the same disk), then export it as one on disk."""
    from launcher.checkpoint import remote

    out = Path(out_text)
    _check_out(out, force)
    with tempfile.TemporaryDirectory(prefix=".launcher-download-", dir=out.parent) as tmp:
        try:
            local = remote.download(url, Path(tmp))
        except remote.NotFound as e:
            raise RecipeError(str(e)) from None
        except OSError as e:
            raise RecipeError(f"{url}: cannot read it: {e}") from None
        return ckpt_export_command(str(local), out_text, force, fmt, max_shard_size, merge, shown=url)
