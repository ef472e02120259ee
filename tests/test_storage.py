"""Checkpoints in object storage, against a real S3 endpoint the tests start on 127.0.0.1 (moto's server, as
s3fs's own tests use): two processes write and prune there, a kill mid-upload leaves an incomplete prefix that
the resume deletes, and the resumed run ends bitwise equal to the uninterrupted one, exported from the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from launcher.layout import is_url
from launcher.storage import Store, shares, url_problem
from tests.conftest import TINY_RECIPE, finish, refused_alike, run_cli, start_ranks

TIMEOUT = 180
SECRET = "wJalrXUtnFEMIxK7MDENGbPxRfiCYEXAMPLEKEY"  # the store's secret: it must show up nowhere


class Gate:
    """Between the clients and the S3 endpoint: from the `after`+1-th upload under `prefix` on, a request is held
    (the test kills the run meanwhile), then refused."""

    def __init__(self) -> None:
        self.prefix, self.after, self.count = "", 0, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def arm(self, prefix: str, after: int) -> None:
        self.prefix, self.after, self.count = prefix, after, 0
        self.reached.clear()
        self.release.clear()

    def holds(self, method: str, path: str) -> bool:
        if not self.prefix or method != "PUT" or not path.startswith(self.prefix):
            return False
        self.count += 1
        if self.count <= self.after:
            return False
        self.reached.set()
        self.release.wait(TIMEOUT)
        return True


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[dict[str, str], Gate]]:
    """A moto S3 server with one bucket, `ckpts`, and the environment a run reaches it with."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: object, **kwargs: object) -> None:
            pass

    moto, gate = DomainDispatcherApplication(create_backend_app), Gate()

    def app(environ, start_response):
        if gate.holds(environ["REQUEST_METHOD"], environ["PATH_INFO"]):
            start_response("503 Service Unavailable", [("Content-Length", "0")])
            return [b""]
        return moto(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the store too
    Store("s3://ckpts").fs.mkdir("ckpts")
    yield env, gate
    gate.release.set()
    server.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_uploads_are_shared_by_size_and_urls_are_told_from_paths():
    assert shares({"a": 10, "b": 9, "c": 2, "d": 1}, 2) == [["a", "d"], ["b", "c"]]
    assert shares({"a": 1}, 3) == [["a"], [], []]
    assert is_url("s3://b/p") and is_url("gs://b") and not is_url("runs/x") and not is_url("file:///tmp/x")
    assert "credentials" in url_problem("checkpoint.dir", f"s3://AKIAEXAMPLE:{SECRET}@ckpts/run")
    assert SECRET not in url_problem("checkpoint.dir", f"s3://AKIAEXAMPLE:{SECRET}@ckpts/run")
    assert url_problem("checkpoint.dir", "s3:///run") == "checkpoint.dir: expected s3://BUCKET/PREFIX, got 's3:///run'"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@ckpts/run", "checkpoint.dir: s3://...: the URL holds credentials"),
        ("s3://no-such-bucket/run", "checkpoint.dir: cannot write to s3://no-such-bucket/run: FileNotFoundError"),
    ],
)
def test_a_store_that_cannot_be_used_is_one_line_and_exit_2(
    s3: tuple[dict[str, str], Gate], tiny_recipe: Path, tmp_path: Path, where: str, expected: str
):
    said = refused_alike(tiny_recipe, f"checkpoint.dir={where}", work=tmp_path)  # validate and train alike
    assert len(said) == 1 and said[0].startswith(expected) and SECRET not in said[0], said


RUN = [
    "strategy.name=fsdp",
    "strategy.timeout_s=60",
    "train.max_steps=60",
    "checkpoint.keep_last=2",
    "eval.every_steps=null",
    "logging.every_steps=10",
]


def test_two_processes_write_prune_survive_a_kill_mid_upload_and_resume_bitwise(
    s3: tuple[dict[str, str], Gate], tmp_path: Path
):
    env, gate = s3
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("hidden_sizes: [32]}", "hidden_sizes: [32], dropout: 0.1}"))

    def ranks(name: str, *extra: str) -> list[subprocess.Popen]:
        run = (f"run_dir={tmp_path / name}", f"checkpoint.dir=s3://ckpts/{name}")
        return start_ranks(2, "train", str(recipe), *run, *RUN, *extra, cwd=tmp_path, env=env)

    full = finish(ranks("full"), TIMEOUT)
    assert [rc for rc, _, _ in full] == [0, 0], full
    store = Store("s3://ckpts/full")
    assert (store.complete_steps(), store.incomplete_steps()) == ([40, 60], [])  # 20 pruned
    assert not list((tmp_path / "full" / "checkpoints").glob("step_*"))  # each staging copy went once uploaded

    gate.arm("/ckpts/crashed/step_00000040/", after=2)  # two files of the second checkpoint get there, no more
    procs = ranks("crashed")
    assert gate.reached.wait(TIMEOUT), [p.poll() for p in procs]
    for p in procs:  # the whole job dies at once, mid-upload
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    gate.release.set()
    gate.arm("", 0)
    store = Store("s3://ckpts/crashed")
    assert (store.complete_steps(), store.incomplete_steps()) == ([20], [40])

    resumed = finish(ranks("crashed", "resume=auto"), TIMEOUT)
    assert [rc for rc, _, _ in resumed] == [0, 0], resumed
    assert "warning: deleting s3://ckpts/crashed/step_00000040: an interrupted upload" in resumed[0][2]
    assert "resumed from s3://ckpts/crashed/step_00000020 at step 20" in resumed[0][1]
    assert (store.complete_steps(), store.incomplete_steps()) == ([40, 60], [])

    import safetensors.torch

    weights = {}
    for name in ("full", "crashed"):
        out = tmp_path / f"{name}.safetensors"
        done = run_cli("ckpt", "export", f"s3://ckpts/{name}/latest", "--out", str(out), cwd=tmp_path)
        assert done.returncode == 0 and f"from s3://ckpts/{name}/latest" in done.stdout, done.stderr
        weights[name] = safetensors.torch.load_file(out)
    assert weights["full"].keys() == weights["crashed"].keys()
    assert all(weights["full"][k].equal(weights["crashed"][k]) for k in weights["full"])  # bitwise
    info = run_cli("ckpt", "info", "s3://ckpts/crashed", cwd=tmp_path)
    assert info.returncode == 0 and info.stdout.count("complete") == 2, info.stderr
    everything = "".join(out + err for _, out, err in full + resumed) + info.stdout + info.stderr
    written = [f.read_bytes() for f in (tmp_path / "crashed").rglob("*") if f.is_file()]  # recipe.yaml, env.json...
    assert SECRET not in everything and not any(SECRET.encode() in content for content in written)


def test_a_background_save_uploads_in_its_thread_and_a_resume_downloads(
    s3: tuple[dict[str, str], Gate], tiny_recipe: Path, tmp_path: Path
):
    """One process, `async_save`: the writer's thread writes and uploads; the staging folder keeps nothing."""
    run = (f"run_dir={tmp_path / 'run'}", "checkpoint.dir=s3://ckpts/async", "checkpoint.async_save=true")
    done = run_cli("train", str(tiny_recipe), *run, "train.max_steps=20", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    more = run_cli("train", str(tiny_recipe), *run, "resume=auto", cwd=tmp_path)
    assert more.returncode == 0 and "resumed from s3://ckpts/async/step_00000020 at step 20" in more.stdout, more.stderr
    assert Store("s3://ckpts/async").complete_steps() == [20, 40]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [".download.lock"]
    report = run_cli("report", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert report.returncode == 0 and json.loads(report.stdout)[0]["checkpoints"] == [20, 40], report.stdout


def test_an_upload_the_store_refuses_ends_the_run_in_one_line_exit_1(
    s3: tuple[dict[str, str], Gate], tiny_recipe: Path, tmp_path: Path
):
    _, gate = s3
    gate.arm("/ckpts/refused/step_", after=0)  # the check before the start writes elsewhere: it passes
    gate.release.set()  # every upload there is answered 503 at once
    try:
        run = (f"run_dir={tmp_path / 'run'}", "checkpoint.dir=s3://ckpts/refused", "train.max_steps=20")
        done = run_cli("train", str(tiny_recipe), *run, cwd=tmp_path)
    finally:
        gate.arm("", 0)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: uploading s3://ckpts/refused/step_00000020/") and line.endswith("there: none"), line
