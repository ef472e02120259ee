"""Is a checkpoint whole? Every file's size and CRC-32, recorded at save in `trainer_state.json`, checked before
anything is loaded.

A disk that fills up, a copy cut short or a file system that loses a write can leave a checkpoint whose
`trainer_state.json` (written last) says it is complete while a file in it is not. The loaders would then fail deep
inside safetensors, torch or DeepSpeed with a traceback, or worse, load garbage tensors without a word. The manifest
names the damaged file in one line instead.

CRC-32 guards against accidents, not attackers: whoever can change a file can change the manifest too; what keeps a
crafted file from running code is that nothing is unpickled (`formats.py`, `shards.py`).

A checkpoint written before manifests has no sizes to compare: its files' own structure is checked instead, from
their headers and ends (`_structure_problem`), which finds a file cut short or emptied, and most overwritten ones,
without reading the tensors: a safetensors file's header gives its exact size, a `torch.save` file is a zip archive
whose directory is at its end, DCP's metadata gives the bytes each shard must hold.

No torch imported here (DCP's metadata aside, read by `shards.py` when a manifest-less DCP checkpoint is checked):
`launcher ckpt info` checks checkpoints without loading them.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from launcher.checkpoint.damage import Damaged, reason
from launcher.layout import DCP_DIR, STATE_FILE

MANIFEST_KEY = "files"  # in trainer_state.json: {relative path: {"size": bytes, "crc32": 8 hex digits}}
CHUNK_BYTES = 4 << 20  # large enough that the checksum runs near memory speed, small enough to stay in cache


def crc32(file: Path) -> str:
    """The file's CRC-32 as 8 hex digits, read in chunks into one reused buffer."""
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    crc = 0
    with file.open("rb", buffering=0) as f:
        while read := f.readinto(buffer):
            crc = zlib.crc32(view[:read], crc)
    return f"{crc:08x}"


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under `directory` (shards in subfolders included) but `trainer_state.json`, which holds this."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f != directory / STATE_FILE)
    checksums = _crc32_all(files)
    return {
        f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "crc32": crc}
        for f, crc in zip(files, checksums, strict=True)  # sorted: the same manifest, byte for byte, for the same files
    }


def _crc32_all(files: list[Path]) -> list[str]:
    """The files' checksums, several files at once: zlib releases the interpreter while it sums a chunk, so the
    weights, the optimizer state and every shard are read side by side on as many cores."""
    if len(files) < 2:
        return [crc32(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(crc32, files))


def read_state(directory: Path) -> dict[str, Any]:
    """The checkpoint's trainer state; Damaged where it is missing, not JSON, not an object or has no step."""
    try:
        state = json.loads((directory / STATE_FILE).read_bytes())
    except FileNotFoundError:
        raise Damaged(STATE_FILE, "missing") from None
    except OSError as e:
        raise Damaged(STATE_FILE, f"unreadable ({e.strerror or e})") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise Damaged(STATE_FILE, f"not JSON ({reason(e)})") from None
    if not isinstance(state, dict):
        raise Damaged(STATE_FILE, "not a JSON object")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise Damaged(STATE_FILE, "has no step")
    return state


def problems(directory: Path) -> str | None:
    """The first thing wrong with a complete checkpoint, as one line (`<file>: <what>`), or None if it is intact.

    Sizes are compared first, so a cut-short file is named before any file is read. A checkpoint written before
    manifests were recorded has its files' structure checked instead (headers and ends, not checksums).
    """
    try:
        expected = _expected(read_state(directory))
        if expected is None:
            _check_structure(directory)
            return None
        _check_sizes(directory, expected)
        _check_checksums(directory, expected)
    except Damaged as e:
        return str(e)
    return None


def _expected(state: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The manifest in a trainer state (None for a checkpoint written without one), Damaged where it is malformed."""
    files = state.get(MANIFEST_KEY)
    if files is None:
        return None
    if not isinstance(files, dict) or not all(_is_entry(name, entry) for name, entry in files.items()):
        raise Damaged(STATE_FILE, f"{MANIFEST_KEY}: not a manifest of files, sizes and checksums")
    return files


def _is_entry(name: Any, entry: Any) -> bool:
    path = PurePosixPath(name) if isinstance(name, str) else None
    # A name that leads out of the checkpoint would have the check read files elsewhere.
    inside = path is not None and not path.is_absolute() and ".." not in path.parts and str(path) != "."
    return (
        inside
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("crc32"), str)
    )


def _check_sizes(directory: Path, expected: dict[str, dict[str, Any]]) -> None:
    for name, entry in expected.items():
        file = directory / name
        if not file.is_file():
            raise Damaged(name, "missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise Damaged(name, f"size {size} bytes, expected {entry['size']}")


def _check_checksums(directory: Path, expected: dict[str, dict[str, Any]]) -> None:
    names = list(expected)
    try:
        actual = _crc32_all([directory / name for name in names])
    except OSError as e:
        name = Path(e.filename).relative_to(directory).as_posix() if e.filename else "a file"
        raise Damaged(name, f"unreadable ({e.strerror or e})") from None
    for name, crc in zip(names, actual, strict=True):
        if crc != expected[name]["crc32"].lower():
            raise Damaged(name, f"checksum differs (crc32 {crc}, expected {expected[name]['crc32']})")


def _check_structure(directory: Path) -> None:
    """Damaged where a payload file of a manifest-less checkpoint is cut short, emptied or not what its name says."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.suffix in _STRUCTURE_CHECKS)
    for file in files:
        name = file.relative_to(directory).as_posix()
        try:
            problem = _STRUCTURE_CHECKS[file.suffix](file)
        except OSError as e:
            raise Damaged(name, f"unreadable ({e.strerror or e})") from None
        if problem is not None:
            raise Damaged(name, problem)
    if (directory / DCP_DIR).is_dir():
        if not (directory / DCP_DIR / ".metadata").is_file():
            raise Damaged(f"{DCP_DIR}/.metadata", "missing")
        _check_dcp_shards(directory / DCP_DIR)


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header naming each tensor's byte range, then exactly
    those bytes: the header alone gives the file's size."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"size {size} bytes, too short for a safetensors header"
        header_bytes = int.from_bytes(head, "little")
        if header_bytes > size - 8:
            return f"size {size} bytes, its header alone claims {header_bytes} bytes"
        try:
            header = json.loads(f.read(header_bytes))
        except ValueError as e:
            return f"not a safetensors file (its header is not JSON: {reason(e)})"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"not a safetensors file (its header gives no data offsets for {key!r})"
        ends.append(offsets[1])
    needed = 8 + header_bytes + max(ends, default=0)
    if size != needed:
        return f"size {size} bytes, its header and tensors make {needed}"
    return None


def _torch_file_problem(file: Path) -> str | None:
    """`torch.save` writes a zip archive, whose directory is at its very end: a file cut short has none. (Torch's
    format before 1.6 is a bare pickle, checked when it loads.)"""
    size = file.stat().st_size
    if size == 0:
        return "size 0 bytes (empty)"
    with file.open("rb") as f:
        magic = f.read(4)
    if magic.startswith(b"\x80"):
        return None
    if magic != b"PK\x03\x04":
        return "not a file torch.save writes (neither a zip archive nor a pickle)"
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        return f"size {size} bytes, not a whole zip archive as torch.save writes ({reason(e)})"
    if any(m.header_offset + m.compress_size > size for m in members):
        return f"size {size} bytes, shorter than its zip directory says"
    return None


def _check_dcp_shards(dcp_dir: Path) -> None:
    """DCP's metadata unpickles and every shard holds the bytes it points into (`shards.py`, whose unpickler knows
    DCP's record classes alone)."""
    from launcher.checkpoint import shards  # torch: only for a manifest-less DCP checkpoint

    with contextlib.suppress(shards.UnsafeCheckpoint):  # not damage: the loader refuses it as unsafe, in its words
        shards.check_dcp(dcp_dir)


_STRUCTURE_CHECKS: dict[str, Callable[[Path], str | None]] = {
    ".safetensors": _safetensors_problem,
    ".pt": _torch_file_problem,
}
