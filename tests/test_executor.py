"""Shard tasks on the local executor and on a local Ray cluster: same files, retries, resume after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas.errors import InputError, TaskError
from scatlas.cli import cli
from scatlas.index import ArrayVectorSource, EmbedderInfo, build_from_source
from scatlas.index.executor import LocalExecutor, RayExecutor, Task, TaskContext, make_executor
from scatlas.query.hunt import HuntClassifier, sweep
from scatlas.query.hunt.calibration import Calibration
from tests.test_index_helpers import array_source, config, digests

ROOT = Path(__file__).resolve().parents[1]
IVF = "IVF64,PQ4"


# -- plain tasks ----------------------------------------------------------------------------------------------
def _square(x: int, *, ctx: TaskContext) -> tuple[int, str, int]:
    if ctx.progress is not None:
        ctx.progress(1)
    return x * x, ctx.device, threading.get_ident()


def _fail(x: int, *, ctx: TaskContext) -> int:
    if x == 2:
        raise ValueError("bad shard")
    if x == 3:
        raise InputError("the source is damaged: rebuild it")
    return x


def test_local_executor_runs_every_task_and_reports_progress():
    got, ticks = {}, []
    LocalExecutor().run([Task(f"t{i}", _square, (i,), cells=1) for i in range(5)],
                        lambda t, r: got.__setitem__(t.key, r[0]), progress=ticks.append)
    assert got == {f"t{i}": i * i for i in range(5)} and sum(ticks) == 5


def test_local_pool_runs_tasks_in_threads_and_wraps_errors():
    got = {}
    pool = LocalExecutor(["cpu", "cpu"])
    pool.run([Task(f"t{i}", _square, (i,)) for i in range(6)], lambda t, r: got.__setitem__(t.args[0], r))
    assert sorted(got) == list(range(6)) and all(r[1] == "cpu" for r in got.values())
    assert threading.get_ident() not in {r[2] for r in got.values()}
    with pytest.raises(TaskError, match="task t2 failed: ValueError: bad shard.*resume"):
        LocalExecutor().run([Task(f"t{i}", _fail, (i,)) for i in range(4)], lambda t, r: None)
    with pytest.raises(InputError, match="damaged"):  # our own errors pass through unwrapped
        pool.run([Task("t3", _fail, (3,))], lambda t, r: None)


def test_executor_choices_are_checked():
    with pytest.raises(InputError, match="unknown executor 'spark'"):
        make_executor("spark")
    with pytest.raises(InputError, match="only used with --executor ray"):
        make_executor("local", ray_address="10.0.0.1:6379")
    with pytest.raises(InputError, match="unknown device"):
        LocalExecutor(["tpu"])
    with pytest.raises(InputError, match="cpus_per_task"):
        RayExecutor(cpus_per_task=0)


class _GpuCluster:
    """An executor that reports GPUs, records what tasks ask for, and runs them here on the CPU."""

    name = "fake-cluster"

    def __init__(self) -> None:
        self.asked: list[float] = []

    def gpu_count(self) -> int:
        return 2

    def describe(self):
        return {"executor": self.name}

    def run(self, tasks, on_done, progress=None):
        for t in tasks:
            self.asked.append(t.gpus)
            on_done(t, t.fn(*t.args, ctx=TaskContext("cpu")))


class _ModelSource(ArrayVectorSource):
    accelerated = True  # as StoreVectorSource with the UCE embedder


@pytest.mark.parametrize(("source_cls", "want"), [(ArrayVectorSource, 0.0), (_ModelSource, 1.0)])
def test_shard_tasks_ask_for_a_gpu_when_the_embedder_runs_a_model(tmp_path, source_cls, want):
    base = array_source(3000, 16)
    src = source_cls(base._x, base._ids)
    cluster = _GpuCluster()
    m = build_from_source(src, tmp_path / "idx", config(shard_size=1000, device="cpu"), executor=cluster)
    assert cluster.asked == [want] * 3 and m.build["task_gpus"] == want and m.build["task_device"] == "cpu"


# -- Ray ------------------------------------------------------------------------------------------------------
ray = pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for this module; workers import the project and these tests."""
    if ray.is_initialized():
        ray.shutdown()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "SCATLAS_THREADS": "1"}
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
                   configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


class KillOnce:
    """A source whose shard ``kill_shard`` kills its worker process the first time it is read (a crashed node)."""

    def __init__(self, src: ArrayVectorSource, kill_shard: int, marker: Path) -> None:
        self.src, self.kill_shard, self.marker = src, kill_shard, marker

    def __getattr__(self, name):  # n_cells, dim, shard_plan, sample, describe
        if name.startswith("_") or name == "src":  # unpickling looks attributes up before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.src, name)

    def iter_vectors(self, spec, chunk_size):
        for i, item in enumerate(self.src.iter_vectors(spec, chunk_size)):
            if spec.shard_no == self.kill_shard and i == 1 and not self.marker.exists():
                self.marker.write_text(str(os.getpid()))
                os._exit(1)
            yield item


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "idx"
    build_from_source(array_source(8000, 32, seed=3), out, config(factory=IVF, shard_size=2000, chunk_size=500),
                      embedder_info=EmbedderInfo("test-vectors", {}, "fp-test", 32))  # the hunt needs a fingerprint
    return out


@pytest.mark.slow
def test_ray_build_equals_local_build_and_retries_a_killed_task(ray_cluster, local_build, tmp_path):
    marker = tmp_path / "killed"
    src = KillOnce(array_source(8000, 32, seed=3), kill_shard=1, marker=marker)
    m = build_from_source(src, tmp_path / "idx", config(factory=IVF, shard_size=2000, chunk_size=500),
                          executor=RayExecutor(max_retries=2))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a Ray worker died mid-shard...
    assert m.build["executor"]["executor"] == "ray" and m.build["cells_added"] == 8000  # ...and was retried
    assert not [p for p in (tmp_path / "idx" / "shards").iterdir() if p.name.startswith(".")]
    assert digests(tmp_path / "idx") == digests(local_build)


@pytest.mark.slow
def test_task_errors_on_ray_are_not_retried_and_keep_their_message(ray_cluster, tmp_path):
    with pytest.raises(TaskError, match="task t2 failed on Ray.*bad shard"):
        RayExecutor(max_retries=3).run([Task(f"t{i}", _fail, (i,)) for i in range(3)], lambda t, r: None)
    with pytest.raises(InputError, match="damaged"):
        RayExecutor().run([Task("t3", _fail, (3,))], lambda t, r: None)


# Shards after the first yield one chunk, then hold (saying so in a file) until the test releases them after it has
# killed this driver: the kill lands mid-shard however slow or loaded the machine is, and a released task fails
# rather than write anything late.
DRIVER = textwrap.dedent("""
    import os, sys, time
    import ray
    from scatlas.index import build_from_source
    from scatlas.index.executor import RayExecutor
    from tests.test_index_helpers import array_source, config

    class Held:
        def __init__(self, src, release):
            self.src, self.release = src, release
        def __getattr__(self, name):
            if name.startswith("_") or name in ("src", "release"):
                raise AttributeError(name)
            return getattr(self.src, name)
        def iter_vectors(self, spec, chunk_size):
            for i, item in enumerate(self.src.iter_vectors(spec, chunk_size)):
                if spec.shard_no > 0 and i == 1:
                    open(self.release + ".held", "w").close()
                    while not os.path.exists(self.release):
                        time.sleep(0.1)
                    raise RuntimeError("released after the driver was killed")
                yield item

    ray.init(address=sys.argv[2], log_to_driver=False, configure_logging=False)
    build_from_source(Held(array_source(8000, 32, seed=3), sys.argv[3]), sys.argv[1],
                      config(factory="IVF64,PQ4", shard_size=2000, chunk_size=500),
                      executor=RayExecutor(max_in_flight=1))
""")


@pytest.mark.slow
def test_driver_killed_mid_build_resumes_on_rerun(ray_cluster, local_build, tmp_path):
    out, release = tmp_path / "idx", tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCATLAS_THREADS": "1"}
    log = tmp_path / "driver.log"  # a file, not a pipe: a chatty driver can never block on a full pipe
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(out), ray_cluster, str(release)], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # No speed assumption: the driver cannot finish shard 1 until released. The limit only guards a hang.
        deadline = time.monotonic() + 900
        held = tmp_path / "release.held"
        while not ((out / "shards" / "0000" / "done.json").exists() and held.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"the driver did not finish shard 0 and start shard 1: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # a crashed driver: no cleanup, tasks in flight lost
        proc.wait()
    finally:
        release.touch()  # any task of the dead driver still held now fails without writing
    assert not (out / "manifest.json").exists()
    assert "0000" in (out / "progress.json").read_text()
    m = build_from_source(array_source(8000, 32, seed=3), out, config(factory=IVF, shard_size=2000, chunk_size=500),
                          executor=RayExecutor())
    assert 1 <= m.build["shards_reused"] < 4
    assert digests(out) == digests(local_build)


@pytest.mark.slow
def test_ray_sweep_equals_local_sweep(ray_cluster, local_build, tmp_path):
    from scatlas.index import AtlasIndex

    idx = AtlasIndex.open(local_build)
    w = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    clf = HuntClassifier(w, -0.1, 0.5, Calibration("platt", a=1.0, b=0.0), "fp-test", "t")
    local = sweep(idx, clf, tmp_path / "local", progress=False, block_size=700)
    remote = sweep(idx, clf, tmp_path / "ray", progress=False, block_size=700, executor=RayExecutor())
    assert remote.n_shards_scored == 4 and local.n_hits == remote.n_hits > 0
    a, b = pd.read_parquet(local.hits_path), pd.read_parquet(remote.hits_path)
    pd.testing.assert_frame_equal(a, b)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_cli_build_and_sweep_on_ray_equal_local_runs(ray_cluster, tmp_path):
    """From an atlas store: the store source and the fitted embedder travel to the Ray workers."""
    _cli("synth", "--atlas", str(tmp_path / "atlas"), "--cells", "2400", "--genes", "200", "--datasets", "2",
         "--rare", "norn cell=0.05@0,1", "--no-progress")
    common = ["--atlas", str(tmp_path / "atlas"), "--shard-size", "800", "--embedder-option", "n_components=16",
              "--fit-sample", "1500", "--factory", "IDMap2,Flat"]
    _cli("build", *common, "--index", str(tmp_path / "local"))
    _cli("build", *common, "--index", str(tmp_path / "ray"), "--executor", "ray", "--ray-address", ray_cluster)
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    classes = [json.loads((tmp_path / d / "labels" / "label_classes.json").read_text())["keys"] for d in ("ray", "local")]
    assert classes[0] == classes[1]
    _cli("hunt", "train", "--index", str(tmp_path / "local"), "--positive-sql", "cell_type = 'norn cell'",
         "--out", str(tmp_path / "clf"), "--background", "500", "--no-progress")
    for name in ("local", "ray"):
        extra = ["--executor", "ray"] if name == "ray" else []
        out = _cli("hunt", "sweep", "--index", str(tmp_path / "local"), "--classifier", str(tmp_path / "clf"),
                   "--out", str(tmp_path / f"sweep-{name}"), "--no-progress", *extra)
        assert "hits" in out
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "sweep-local" / "hits.parquet"),
                                  pd.read_parquet(tmp_path / "sweep-ray" / "hits.parquet"))
    res = CliRunner().invoke(cli, ["build", *common, "--index", str(tmp_path / "x"), "--ray-address", "auto"])
    assert res.exit_code != 0 and "only used with --executor ray" in res.output
