"""Stage overlap (workers/pipelining.py, workers/local.py): same items in the same order, errors
where they happened, bounded look-ahead, and a failed commit stops the job."""

from __future__ import annotations

import threading
import time

import pytest

from codelens.workers.job import run_job
from codelens.workers.local import LocalExecutor
from codelens.workers.pipelining import prefetch


def test_prefetch_keeps_order_and_runs_at_most_depth_ahead():
    made: list[int] = []

    def items():
        for i in range(20):
            made.append(i)
            yield i

    with prefetch(items(), depth=2) as ahead:
        first = next(ahead)
        time.sleep(0.2)  # the producer fills the buffer, then waits
        assert first == 0 and len(made) <= 4, "depth 2 buffered + one being made + one taken"
        assert [first, *ahead] == list(range(20))


def test_prefetch_raises_where_the_producer_failed():
    def items():
        yield 1
        yield 2
        raise ValueError("corpus file vanished")

    seen = []
    with pytest.raises(ValueError, match="corpus file vanished"):
        with prefetch(items(), depth=1) as ahead:
            for item in ahead:
                seen.append(item)
    assert seen == [1, 2]


def test_leaving_early_stops_the_producer():
    stopped = threading.Event()

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            stopped.set()

    with prefetch(items(), depth=1) as ahead:
        assert next(ahead) == 0
    assert stopped.is_set(), "the producer closed the generator when the consumer left"
    with pytest.raises(ValueError, match="depth must be >= 1"):
        with prefetch([], depth=0):
            pass


@pytest.fixture
def small_job(tiny_model_dir, tmp_path, write_corpus, job_spec):
    """``small_job(out)``: a job of about eight small shards over six files, into ``out``."""
    files = {f"m{i}.py": f"def f{i}(x):\n    return x * {i} + {i}\n" * 6 for i in range(6)}
    corpus = write_corpus(tmp_path / "corpus", files)

    def make(out):
        return job_spec(
            tiny_model_dir("llama"),
            corpus,
            out,
            tokens={"window": 32, "overlap": 4},
            output={"shard_tokens": 40},
        )

    return make


def test_a_failed_commit_stops_the_job_and_loses_nothing_committed(
    small_job, tmp_path, read_manifest, monkeypatch
):
    spec = small_job(tmp_path / "run")
    from codelens.engine.run.rundir import RunDir

    original = RunDir.commit_shard

    def disk_full(self, shard, table, entry):
        if shard == 2:
            raise OSError(28, "No space left on device")
        return original(self, shard, table, entry)

    monkeypatch.setattr(RunDir, "commit_shard", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_job(spec, show_progress=False, executor=LocalExecutor(spec))
    assert [e["shard"] for e in read_manifest(tmp_path / "run")] == [0, 1]
    monkeypatch.setattr(RunDir, "commit_shard", original)
    outcome = run_job(spec, show_progress=False)
    assert outcome.state == "done"
    shards = [e["shard"] for e in read_manifest(tmp_path / "run")]
    assert sorted(shards) == list(range(len(shards))) and len(set(shards)) == len(shards)


def test_a_sticky_cuda_error_stops_the_job_cleanly_and_a_rerun_completes_it(
    small_job,
    tmp_path,
    read_manifest,
    read_status,
    broken_device_worker,
):
    from codelens.workers.worker import DeviceFailedError

    spec = small_job(tmp_path / "run")
    (tmp_path / "markers").mkdir()
    broken = LocalExecutor(spec, worker_cls=broken_device_worker(tmp_path / "markers", 2))
    with pytest.raises(DeviceFailedError, match=r"shard 2: RuntimeError: CUDA error: an illegal"):
        run_job(spec, show_progress=False, executor=broken)
    # The shards before it are committed; nothing after it ran on the broken device.
    assert [e["shard"] for e in read_manifest(tmp_path / "run")] == [0, 1]
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed"
    assert [f["shard"] for f in status["failures"] if f["shard"] is not None] == [2]
    assert run_job(spec, show_progress=False).state == "done"
    shards = sorted(e["shard"] for e in read_manifest(tmp_path / "run"))
    assert shards == list(range(len(shards))) and len(shards) > 3
