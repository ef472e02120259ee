"""python -m bench.storage: a checkpoint in object storage against what a hand-written script does.

One process on this machine's CPU, the model of `bench/checkpoint_io.py` (N million parameters with AdamW state),
and an S3 endpoint on 127.0.0.1 (moto's server, in a process of its own: no network in the figures, so they show
the launcher's overhead over the same uploads, not S3's speed). Medians of `repeats`:

- save: the launcher's checkpoint with `checkpoint.dir: s3://...` (written and checksummed on disk, every file
  uploaded, the trainer state last, the staging copy removed) against `torch.save` to a local file plus one
  s3fs `put_file` of it, as a script that uploads its checkpoints is written; and how long training stalls with
  `async_save` (the upload then runs in the writer's thread);
- resume: `resume=auto`'s path (list the store, download the newest complete checkpoint, verify every checksum,
  load) against s3fs `get_file` plus `torch.load` and `load_state_dict`.

    python -m bench.storage [--params-millions 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = """
import sys
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server
class Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs): pass
make_server("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=True,
            request_handler=Quiet).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_endpoint() -> subprocess.Popen:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    raise RuntimeError("the S3 endpoint did not start")


def run(params_millions: float, repeats: int, root: Path) -> str:
    import torch
    from accelerate import Accelerator

    from bench.checkpoint_io import build, size_of, timed
    from launcher import checkpoint
    from launcher.checkpoint import integrity
    from launcher.storage import Store, fetch_newest

    model, optimizer = build(params_millions)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    store = Store("s3://bench/run")
    store.fs.mkdir("bench")
    staging, plain = root / "checkpoints", root / "plain.pt"
    writers = {}
    for background in (False, True):
        writers[background] = checkpoint.Writer(Accelerator(cpu=True), model, optimizer, scheduler, "full", background)
        writers[background].store = store
    step = iter(range(1, 1000))

    def launcher_save(background: bool) -> None:
        # Retention keeps the newest: the endpoint holds everything in its memory.
        writers[background].save(staging / checkpoint.step_dir_name(next(step)), {"step": 1}, "",
                                 after=lambda: store.prune(store.complete_steps()[:-1]))  # fmt: skip

    def plain_save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, plain)
        store.fs.put_file(str(plain), "bench/plain/model.pt")

    def wait_upload() -> None:
        writers[True].wait()

    plain_save()
    size = size_of(plain)
    launcher_save(False)
    rows = [
        ("save", "`torch.save` + one s3fs `put_file`", timed(plain_save, repeats)),
        ("save", "launcher checkpoint to `s3://` (on disk, checksums, upload, state last)", timed(
            lambda: launcher_save(False), repeats)),
        ("save", "launcher, `async_save`: training stalls for", timed(lambda: launcher_save(True), repeats,
                                                                      before=wait_upload)),
    ]  # fmt: skip
    wait_upload()

    def plain_load() -> None:
        store.fs.get_file("bench/plain/model.pt", str(plain))
        state = torch.load(plain, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def launcher_resume() -> None:
        local, _ = fetch_newest(store, root / "resume", integrity.problems)
        assert local is not None
        checkpoint.load(Accelerator(cpu=True), local, model, optimizer, scheduler, "full")
        (local / "trainer_state.json").unlink()  # the next round downloads again

    rows += [
        ("resume", "s3fs `get_file` + `torch.load` + `load_state_dict`", timed(plain_load, repeats)),
        ("resume", "launcher `resume=auto` (list, download, checksums, load)", timed(launcher_resume, repeats)),
    ]
    return table(params_millions, size, repeats, rows)


def table(params_millions: float, size: int, repeats: int, rows: list[tuple[str, str, float]]) -> str:
    base = {kind: next(t for k, _, t in rows if k == kind) for kind in ("save", "resume")}
    lines = [
        f"{params_millions:g}M parameters with AdamW state ({size / 2**30:.2f} GiB), one process on "
        f"{platform.machine()} ({os.cpu_count()} cores), an S3 endpoint (moto) on 127.0.0.1; medians of {repeats}.",
        "",
        "| | way | time | time vs the hand-written way |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {kind} | {way} | {t:.2f} s | {t / base[kind]:.2f}x |" for kind, way, t in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-millions", type=float, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    server = start_endpoint()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(run(args.params_millions, args.repeats, Path(tmp)))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
