"""``execution.gpus_per_worker`` through a job: where a worker cannot split, it says so at start.

The split itself is tested on the CPU in ``tests/engine/model/test_placement.py`` (devices named
to ``load_model``); here the job path: the worker lists this process's GPUs before reading any
weight, and refuses with the count it saw and the fix.
"""

from __future__ import annotations

import pytest
import torch

from codelens.engine.errors import ModelLoadError
from codelens.workers.job import run_job
from codelens.workers.worker import LensWorker


def test_a_worker_without_enough_gpus_names_how_many_it_sees(
    tiny_model_dir, tmp_path, write_corpus, job_spec
):
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    corpus = write_corpus(tmp_path / "corpus", {"a.py": "def f(x):\n    return x\n"})
    wanted = max(2, visible + 1)  # 1 would not split
    spec = job_spec(
        tiny_model_dir("llama"),
        corpus,
        tmp_path / "run",
        device=None,  # auto: a split needs GPUs, model.device cpu is refused by the spec
        execution={"gpus_per_worker": wanted},
    )
    with pytest.raises(ModelLoadError) as info:
        LensWorker(spec).load()
    assert f"gpus_per_worker is {wanted}, but this process sees {visible} CUDA" in str(info.value)
    with pytest.raises(ModelLoadError, match="lower execution.gpus_per_worker"):
        run_job(spec, show_progress=False)
