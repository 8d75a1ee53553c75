"""The Ray backend end to end, on the session's local Ray instance (``ray_cluster``, 2 CPUs).

Every Ray run is compared with the local backend's run of the same job: rows must be equal, row
for row and bit for bit, and summary.json identical. Faults are real ones: worker processes killed
with SIGKILL from the test, the driver (a ``codelens run`` subprocess) killed with SIGKILL, and a
document the model genuinely cannot run (a token id beyond its embedding table). One fault is
injected through ``run_job(spec, executor=RayExecutor(spec, worker_cls=...))`` with a worker class
from conftest.py (``shard_killing_worker``): a worker that dies every time it touches one shard.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

pytest.importorskip("ray")

from codelens.engine.errors import CodelensError  # noqa: E402
from codelens.engine.schemas import JobSpec  # noqa: E402
from codelens.workers.executor import Executor  # noqa: E402
from codelens.workers.job import JobFailedError, run_job  # noqa: E402
from codelens.workers.local import LocalExecutor  # noqa: E402
from codelens.workers.ray_backend import RayExecutor, gpu_actor_count  # noqa: E402

pytestmark = pytest.mark.ray

N_DOCS = 8


# Eight Python files of ~230 tokens: with 64-token windows, about 33 shards of 48 tokens.
FILES = {
    f"m{i}.py": "".join(
        f"def f{j}_{i}(x, y):\n    if x > {j}:\n        return x * {i} + y\n    return None\n\n"
        for j in range(6)
    )
    for i in range(N_DOCS)
}
# The Ray job of these tests: ``job_spec(model, corpus, out, JOB, execution={...})``.
JOB = {
    "name": "ray-test",
    "tokens": {"window": 64, "overlap": 8},
    "lens": {"k": 5, "lookahead": [2], "token_sets": {"kw": ["def", "return"]}},
    "output": {"shard_tokens": 48},
    "execution": {"backend": "ray", "workers": 2, "batch_tokens": 256},
}


def assert_each_row_once(table: pa.Table) -> None:
    keys = np.stack([table.column(c).to_numpy() for c in ("doc", "pos", "layer")], axis=1)
    assert len(np.unique(keys, axis=0)) == table.num_rows, "a (doc, pos, layer) row is duplicated"


def shards(entries: list[dict[str, Any]]) -> list[int]:
    return [entry["shard"] for entry in entries]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, write_corpus) -> Path:
    return write_corpus(tmp_path_factory.mktemp("ray-corpus"), FILES)


@contextlib.contextmanager
def actor_threads() -> Iterator[None]:
    """Run torch in this process with the threads of a session-cluster actor (1).

    Two actors share the session's 2 CPUs, so each runs one torch thread. A float reduction split
    over more threads may round differently in the last bit, so a bit-for-bit reference must use
    the same thread count; any other difference is a real bug.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_local(spec: JobSpec) -> None:
    with actor_threads():
        run_job(spec, show_progress=False)


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, corpus, tmp_path_factory, job_spec, read_manifest) -> Path:
    """The reference: the same job on the local backend."""
    out = tmp_path_factory.mktemp("ray-ref") / "run"
    run_local(job_spec(tiny_model_dir("llama"), corpus, out, JOB, execution={"backend": "local"}))
    assert len(shards(read_manifest(out, running=True))) > 20, (
        "the job must have many shards for the fault tests"
    )
    return out


def test_missing_ray_is_named(tiny_model_dir, corpus, tmp_path, monkeypatch, job_spec):
    from codelens.engine.errors import CodelensError
    from codelens.workers import ray_backend

    monkeypatch.setattr(ray_backend, "ray", None)
    with pytest.raises(CodelensError, match=r"pip install 'code-llm-lens\[ray\]'"):
        run_job(
            job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB), show_progress=False
        )


def test_cpu_workers_share_the_cores(ray_cluster, tiny_model_dir, corpus, tmp_path, job_spec):
    import ray

    from codelens.workers.ray_backend import RayExecutor

    # Actors of an earlier test are released asynchronously: wait for the 2 CPUs to be free.
    wait_for(lambda: ray.available_resources().get("CPU", 0) == 2, 30, "the CPUs to be free")
    model = tiny_model_dir("llama")
    plans = {
        n: RayExecutor(
            job_spec(model, corpus, tmp_path, JOB, execution={"workers": n})
        )._plan_actors()
        for n in (1, 2, 4)
    }
    # (actors, resources per actor, torch threads per actor)
    assert plans[1] == (1, {"num_cpus": 1.0, "num_gpus": 0, "scheduling_strategy": "SPREAD"}, 2)
    assert plans[2] == (2, {"num_cpus": 1.0, "num_gpus": 0, "scheduling_strategy": "SPREAD"}, 1)
    assert plans[4] == (4, {"num_cpus": 0.5, "num_gpus": 0, "scheduling_strategy": "SPREAD"}, 1)
    # A model split over GPUs needs GPUs: on this GPU-less cluster that is refused, with the fix.
    split = job_spec(model, corpus, tmp_path, JOB, device=None, execution={"gpus_per_worker": 2})
    with pytest.raises(CodelensError, match="gpus_per_worker is 2, but the Ray cluster has no GPU"):
        RayExecutor(split)._plan_actors()


@pytest.mark.parametrize(
    "node_gpus,per_worker,actors",
    [([8], 1, 8), ([8, 8], 2, 8), ([8, 8], 3, 4), ([4, 0, 2], 2, 3), ([8], 8, 1)],
)
def test_gpu_actors_reserve_gpus_per_worker_gpus_of_one_node(node_gpus, per_worker, actors):
    assert gpu_actor_count(node_gpus, per_worker) == actors


@pytest.mark.parametrize(
    "node_gpus,per_worker,expected",
    [
        ([2, 2], 8, "the Ray cluster has 4 GPU(s) in all: lower execution.gpus_per_worker to 2"),
        ([4, 4], 8, "no node has that many (the largest has 4; a worker uses one node's): lower"),
    ],
)
def test_too_few_gpus_for_one_worker_are_refused_with_the_fix(node_gpus, per_worker, expected):
    with pytest.raises(CodelensError) as info:
        gpu_actor_count(node_gpus, per_worker)
    assert f"gpus_per_worker is {per_worker}, but {expected}" in str(info.value)


def test_ray_run_equals_the_local_run(
    ray_cluster,
    tiny_model_dir,
    corpus,
    local_run,
    tmp_path,
    job_spec,
    read_manifest,
    read_status,
    assert_same_rows,
):
    out = tmp_path / "run"
    outcome = run_job(job_spec(tiny_model_dir("llama"), corpus, out, JOB), show_progress=False)

    assert outcome.state == "done" and outcome.resolved["backend"] == "ray"
    workers = outcome.resolved["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert all(w["pid"] != os.getpid() and w["torch_threads"] == 1 for w in workers)
    assert outcome.resolved["ray"]["started_local_cluster"] is False  # attached to the session's
    assert_same_rows(pq.read_table(out / "lens"), pq.read_table(local_run / "lens"))
    assert (out / "summary.json").read_text() == (local_run / "summary.json").read_text()
    assert sorted(shards(read_manifest(out, running=True))) == sorted(
        shards(read_manifest(local_run, running=True))
    )
    st = read_status(out)
    assert (st["state"], st["workers_alive"], st["retries"], st["failures"]) == ("done", 2, 0, [])


def test_killed_workers_are_restarted_and_every_row_is_written_once(
    ray_cluster,
    tiny_model_dir,
    corpus,
    local_run,
    tmp_path,
    job_spec,
    read_manifest,
    read_status,
    assert_same_rows,
):
    from typer.testing import CliRunner

    from codelens.workers.cli import app

    out = tmp_path / "run"
    errors: list[BaseException] = []

    def job() -> None:
        try:
            run_job(job_spec(tiny_model_dir("llama"), corpus, out, JOB), show_progress=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    driver = threading.Thread(target=job)
    driver.start()
    wait_for(
        lambda: len(shards(read_manifest(out, running=True))) >= 1 or not driver.is_alive(),
        180,
        "a first commit",
    )
    total = len(shards(read_manifest(local_run, running=True)))
    assert len(shards(read_manifest(out, running=True))) < total, (
        "the job ended before the workers could be killed"
    )
    pids = [w["pid"] for w in json.loads((out / "job.json").read_text())["resolved"]["workers"]]
    for pid in pids:  # both: the job can only finish on restarted processes that reloaded the model
        os.kill(pid, signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive(), "the job hung after its workers were killed"
    if errors:
        raise errors[0]

    table = pq.read_table(out / "lens")
    assert_each_row_once(table)
    assert_same_rows(table, pq.read_table(local_run / "lens"))
    assert (out / "summary.json").read_text() == (local_run / "summary.json").read_text()
    assert sorted(shards(read_manifest(out, running=True))) == list(range(total)), (
        "each shard committed exactly once"
    )
    st = read_status(out)
    assert st["state"] == "done" and st["failures"] == []
    assert st["retries"] >= 2, "each killed worker held at least one shard that had to run again"
    assert 1 <= st["workers_alive"] <= 2

    shown = CliRunner().invoke(app, ["status", str(out)])
    assert shown.exit_code == 0, shown.output
    words = [line.split() for line in shown.output.splitlines() if line.strip()]
    rows = {" ".join(w[:-1]): w[-1] for w in words}
    assert rows["retries"] == str(st["retries"])
    assert rows["workers alive"] == str(st["workers_alive"])


def test_killed_driver_resumes_with_each_row_once(
    ray_cluster,
    tiny_model_dir,
    corpus,
    local_run,
    tmp_path,
    job_spec,
    read_manifest,
    read_status,
    assert_same_rows,
):
    out = tmp_path / "run"
    spec = job_spec(
        tiny_model_dir("llama"), corpus, out, JOB, execution={"ray_address": ray_cluster}
    )
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    command = [sys.executable, "-m", "codelens.workers.cli", "run", str(job_file)]
    log_file = tmp_path / "driver.log"
    with open(log_file, "wb") as sink:
        driver = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:

        def ended() -> bool:
            return len(shards(read_manifest(out, running=True))) >= 2 or driver.poll() is not None

        wait_for(ended, 180, "two commits")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == -signal.SIGKILL, log_file.read_text()[-2000:]
    before = shards(read_manifest(out, running=True))
    total = len(shards(read_manifest(local_run, running=True)))
    assert 2 <= len(before) < total, "the driver must die mid-run"
    assert read_status(out)["state"] == "running", "a killed driver leaves its last status behind"

    # The same job again (in this process, which attaches to the same Ray instance).
    outcome = run_job(spec, show_progress=False)
    assert outcome.shards_run == total - len(set(before))
    table = pq.read_table(out / "lens")
    assert_each_row_once(table)
    assert_same_rows(table, pq.read_table(local_run / "lens"))
    assert sorted(set(shards(read_manifest(out, running=True)))) == list(range(total))
    assert read_status(out)["state"] == "done"


@pytest.fixture(scope="module")
def poisoned(tiny_model_dir, tmp_path_factory, write_corpus) -> tuple[Path, Path]:
    """A model whose tokenizer has a token its embedding table lacks, and a corpus that uses it.

    A real-world mismatch: a tokenizer given extra special tokens without resizing the model's
    embeddings. The load-time probe never meets the token, so the job starts, and every forward
    pass over the document holding it raises ``IndexError`` (on a CPU) deterministically.
    """
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path_factory.mktemp("poisoned") / "model"
    shutil.copytree(tiny_model_dir("llama", vocab_size=400), model_dir)  # no padded rows
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tokenizer.save_pretrained(model_dir)
    assert tokenizer.convert_tokens_to_ids("<|extra|>") == 400
    corpus = tmp_path_factory.mktemp("poisoned-corpus")
    write_corpus(corpus, {**FILES, "m3b.py": "marker = '<|extra|>'\n"})
    return model_dir, corpus


def test_poisoned_shard_fails_after_three_attempts_and_only_it_is_retried(
    ray_cluster, poisoned, tmp_path, job_spec, read_manifest, read_status, assert_same_rows
):
    model_dir, corpus = poisoned
    local_out, out = tmp_path / "local", tmp_path / "run"
    with pytest.raises(JobFailedError):
        run_local(job_spec(model_dir, corpus, local_out, JOB, execution={"backend": "local"}))
    [expected] = read_status(local_out)["failures"]
    assert expected["error"] == "IndexError: index out of range in self"

    named = rf"shard {expected['shard']}: IndexError: index out of range"
    with pytest.raises(JobFailedError, match=named):
        run_job(job_spec(model_dir, corpus, out, JOB), show_progress=False)
    st = read_status(out)
    assert st["state"] == "failed"
    error = f"{expected['error']} (after 3 attempts)"
    assert st["failures"] == [{"shard": expected["shard"], "error": error}]
    assert st["retries"] == 2, "two retries, then the third failure is final"
    # Everything else is committed, and equal to what the local backend committed.
    assert sorted(shards(read_manifest(out, running=True))) == sorted(
        shards(read_manifest(local_out, running=True))
    )
    assert_same_rows(pq.read_table(out / "lens"), pq.read_table(local_out / "lens"))

    # A rerun runs that shard alone (the committed parts are untouched) and names it again.
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "lens").glob("part-*.parquet")}
    with pytest.raises(JobFailedError, match=rf"1 shard\(s\) failed \(shard {expected['shard']}:"):
        run_job(job_spec(model_dir, corpus, out, JOB), show_progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "lens").glob("part-*.parquet")} == parts
    st = read_status(out)
    assert st["shards_done"] == st["shards_total"] - 1 and st["retries"] == 2


def test_local_and_ray_executors_implement_the_executor_protocol(
    tiny_model_dir, corpus, tmp_path, job_spec
):
    protocol_methods = ("start", "run", "shutdown")
    for backend, cls in (("local", LocalExecutor), ("ray", RayExecutor)):
        executor = cls(
            job_spec(tiny_model_dir("llama"), corpus, tmp_path, JOB, execution={"backend": backend})
        )
        assert isinstance(executor, Executor), cls
        for name in protocol_methods:
            wanted = inspect.signature(getattr(Executor, name))
            assert inspect.signature(getattr(cls, name)) == wanted, f"{cls.__name__}.{name}"


def test_shard_that_kills_every_worker_is_given_up_and_later_completed(
    ray_cluster,
    tiny_model_dir,
    corpus,
    local_run,
    tmp_path,
    shard_killing_worker,
    job_spec,
    read_manifest,
    read_status,
    assert_same_rows,
):
    out = tmp_path / "run"
    spec = job_spec(tiny_model_dir("llama"), corpus, out, JOB)
    killed_by_shard_5 = RayExecutor(spec, worker_cls=shard_killing_worker(5))
    with pytest.raises(JobFailedError, match=r"1 shard\(s\) failed \(shard 5: worker died"):
        run_job(spec, show_progress=False, executor=killed_by_shard_5)
    st = read_status(out)
    assert [f["shard"] for f in st["failures"]] == [5]
    assert st["failures"][0]["error"].endswith("(after 3 attempts)")
    # The shards queued behind shard 5 on the dying workers were requeued without blame.
    total = len(shards(read_manifest(local_run, running=True)))
    assert sorted(shards(read_manifest(out, running=True))) == [i for i in range(total) if i != 5]
    assert st["retries"] >= 2

    # Without the fault (the default executor), the rerun completes the shard given up on.
    assert run_job(spec, show_progress=False).shards_run == 1
    assert_same_rows(pq.read_table(out / "lens"), pq.read_table(local_run / "lens"))
    assert (out / "summary.json").read_text() == (local_run / "summary.json").read_text()


def test_a_sticky_cuda_error_restarts_the_actor_and_the_shard_is_redone(
    ray_cluster,
    tiny_model_dir,
    corpus,
    local_run,
    tmp_path,
    broken_device_worker,
    job_spec,
    read_status,
    assert_same_rows,
):
    out = tmp_path / "run"
    (tmp_path / "markers").mkdir()
    spec = job_spec(tiny_model_dir("llama"), corpus, out, JOB)
    broken = RayExecutor(spec, worker_cls=broken_device_worker(tmp_path / "markers", 3))
    outcome = run_job(spec, show_progress=False, executor=broken)
    assert outcome.state == "done"
    assert (tmp_path / "markers" / "broke-3").exists(), "the fault was injected"
    st = read_status(out)
    assert st["failures"] == [] and st["retries"] >= 1, "shard 3 was retried after the restart"
    assert_same_rows(pq.read_table(out / "lens"), pq.read_table(local_run / "lens"))
    assert (out / "summary.json").read_text() == (local_run / "summary.json").read_text()


def test_workers_write_their_parts_and_a_part_written_twice_is_committed_once(
    ray_cluster,
    tiny_model_dir,
    corpus,
    local_run,
    tmp_path,
    dies_after_writing_worker,
    job_spec,
    read_manifest,
    read_status,
    assert_same_rows,
):
    out, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    spec = job_spec(tiny_model_dir("llama"), corpus, out, JOB)
    # Shards 2 and 7 are written by a worker that dies before the driver hears of them: each is
    # computed and written again by another process under another name, and committed once.
    executor = RayExecutor(spec, worker_cls=dies_after_writing_worker(markers, 2, 7))
    assert run_job(spec, show_progress=False, executor=executor).state == "done"

    first_writes = [Path((markers / f"wrote-{i}").read_text()) for i in (2, 7)]
    assert all(p.parent == out.resolve() / "_staging" for p in first_writes)
    assert not (out / "_staging").exists(), "the orphaned first writes are removed"
    table = pq.read_table(out / "lens")
    assert_each_row_once(table)
    assert_same_rows(table, pq.read_table(local_run / "lens"))
    assert (out / "summary.json").read_text() == (local_run / "summary.json").read_text()
    total = len(shards(read_manifest(local_run, running=True)))
    assert sorted(shards(read_manifest(out, running=True))) == list(range(total))
    st = read_status(out)
    assert st["state"] == "done" and st["failures"] == [] and st["retries"] >= 2


def test_a_run_dir_the_workers_cannot_see_is_refused_before_any_work(
    ray_cluster, tiny_model_dir, corpus, tmp_path, node_local_disk_worker, job_spec
):
    from codelens.engine.errors import CodelensError

    out = tmp_path / "run"
    spec = job_spec(tiny_model_dir("llama"), corpus, out, JOB)
    elsewhere = RayExecutor(spec, worker_cls=node_local_disk_worker(tmp_path / "other-node"))
    with pytest.raises(CodelensError) as caught:
        run_job(spec, show_progress=False, executor=elsewhere)
    message = str(caught.value)
    assert f"cannot use the run directory {out.resolve()}: it cannot read" in message
    assert "mount at the same path" in message and "execution.backend: local" in message
    assert not (out / "job.json").exists() and not list((out / "lens").glob("*"))
    assert not (out / "_staging").exists() or not list((out / "_staging").iterdir())


def test_a_second_result_of_a_committed_shard_is_dropped_with_its_part(tmp_path, monkeypatch):
    """Two actors can both finish one shard (a task resubmitted after a death that was not one):
    the driver commits the first result and drops the second, deleting the part file that
    actor staged, so the shard is in the manifest and in lens/ once."""
    import ray

    from codelens.engine.data.windows import Shard
    from codelens.workers import ray_backend
    from codelens.workers.worker import ShardResult

    class Tracker:
        def __init__(self) -> None:
            self.done: list[int] = []

        def shard_done(self, n_tokens: int) -> None:
            self.done.append(n_tokens)

    class Executor:
        _slots: list = []

    committed: list[int] = []
    tracker = Tracker()
    scheduler = ray_backend._Scheduler(Executor(), [], lambda r: committed.append(r.index), tracker)
    slot = ray_backend._Slot(0, actor=None, info={"pid": 1, "hostname": "h"})
    shard = Shard(3, (), 10)
    results = {}
    for ref in ("first", "second"):
        staged = tmp_path / f"part-{ref}.parquet"
        staged.write_bytes(b"rows")
        results[ref] = ShardResult(3, None, None, 10, 1.0, 20, staged=staged)
        task = ray_backend._Task(shard, slot, 1, staged, alone=False)
        slot.inflight.append(task)
        scheduler.tasks[ref] = task
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: results[ref])

    for ref in ("first", "second"):
        scheduler._on_task(scheduler.tasks.pop(ref), ref)

    assert committed == [3] and tracker.done == [10] and slot.inflight == []
    assert (tmp_path / "part-first.parquet").exists()  # the driver's commit would move it
    assert not (tmp_path / "part-second.parquet").exists()
