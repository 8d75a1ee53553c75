"""End to end: job spec -> run directory, checked against a float64 reference built independently.

The reference runs the HF model on each window with ``output_hidden_states`` (not our hooks),
reads layers 0..L-1 through the family's head in float64 and takes the model's *own* logits for
layer L, then computes every statistic from full logits (``lens_stats_from_logits``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from codelens.engine.errors import CodelensError, RunDirError
from codelens.engine.run.lock import LOCK_NAME, DriverLock
from codelens.engine.schemas import validate_spec
from codelens.engine.zoo.tiny_models import MODERN_FAMILIES, MULTIMODAL_FAMILIES, TINY_FAMILIES
from codelens.kernels import LensRequest, lens_stats_from_logits
from codelens.workers.job import run_job

SNIPPETS = {
    "a.py": (
        "def add(a, b):\n    return a + b\n\n\n"
        "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    ),
    "b.py": (
        "import os\n\nfor name in os.listdir('.'):\n"
        "    if name.endswith('.py'):\n        print(name)\n"
    ),
    "c.py": "x = [i * i for i in range(10)]\nprint(sum(x))\n",
    "empty.py": "   \n",
    "blob.py": b"\x00\x01\x02binary\x00data",
    "latin1.py": "caf\xe9 = 1\n".encode("latin-1"),
}
FLOAT_COLUMNS = ("lse", "entropy", "target_logprob", "kl_final", "set_kw")
# The job of these tests (``job_spec(model, corpus, out, JOB, lens={...})`` changes a part of it).
JOB = {
    "name": "test",
    "tokens": {"window": 128, "overlap": 16},
    "lens": {"k": 5, "lookahead": [2, 3], "token_sets": {"kw": ["def", "return", 7]}},
    "output": {"shard_tokens": 40},
    "execution": {"batch_tokens": 256},
}


@pytest.fixture
def corpus(tmp_path, write_corpus) -> Path:
    """``SNIPPETS`` written to ``tmp_path/corpus``."""
    return write_corpus(tmp_path / "corpus", SNIPPETS)


def reference(loaded, ids: list[int], bos: int | None, request: LensRequest, offsets=(2, 3)):
    """Float64 statistics for one document run as a single window ``[bos] + ids``."""
    model, head = loaded.model, loaded.parts.head
    inp = torch.tensor([([bos] if bos is not None else []) + ids])
    skip = 1 if bos is not None else 0
    with torch.no_grad():
        out = model(inp, output_hidden_states=True, use_cache=False)
    n_blocks = len(loaded.parts.blocks)
    z = [
        head.logits(out.hidden_states[layer][0, skip:].double(), torch.float64)
        for layer in range(n_blocks)
    ]
    z.append(out.logits[0, skip:].double())  # layer L: the model's own logits
    z = torch.stack(z)
    n = len(ids)
    targets = torch.full((n, 1 + len(offsets)), -1, dtype=torch.long)
    for i in range(n):
        for c, o in enumerate((1, *offsets)):
            if i + o < n:
                targets[i, c] = ids[i + o]
    return lens_stats_from_logits(z, targets, request, z[-1]), z, targets


def rank_bounds(z: torch.Tensor, targets: torch.Tensor, tol: float) -> tuple[np.ndarray, ...]:
    """``(lo, hi)`` ``[L, n, C]``: the ranks a float32 computation may give each target.

    ``lo`` counts the logits above the target's by more than ``tol``, ``hi`` those above it by
    more than ``-tol``: a logit within ``tol`` of the target's may land on either side of it.
    -1 where there is no target.
    """
    t = z.gather(-1, targets.clamp(min=0).expand(z.shape[0], -1, -1))  # [L, n, C]
    gap = z[:, :, None, :] - t[..., None]  # [L, n, C, V]
    lo = (gap > tol).sum(-1).numpy()
    hi = (gap > -tol).sum(-1).numpy() - 1  # the target itself is within -tol
    none = (targets < 0).expand_as(t).numpy()
    return np.where(none, -1, lo), np.where(none, -1, hi)


@pytest.mark.parametrize("family", TINY_FAMILIES + MODERN_FAMILIES + MULTIMODAL_FAMILIES)
def test_every_family_every_column_matches_the_float64_reference(
    family, tiny_model_dir, tiny_loaded_model, tmp_path, corpus, job_spec, read_rows
):
    """Through the real path (config, safetensors, load, self-check, run) for every family: the
    surgery table's and those the general rule reads (``head_source`` says which)."""
    model_dir = tiny_model_dir(family)
    spec = job_spec(model_dir, corpus, tmp_path / "run", JOB)
    outcome = run_job(spec, show_progress=False)
    assert outcome.state == "done" and outcome.resolved["impl"] == "torch"
    expected_source = "table" if family in TINY_FAMILIES else "rule"
    assert outcome.resolved["head_source"] == expected_source
    recorded = json.loads((tmp_path / "run" / "job.json").read_text())["resolved"]
    assert recorded["head_source"] == expected_source and recorded["family"] == family
    run_dir = tmp_path / "run"
    rows = read_rows(run_dir)
    docs = pq.read_table(run_dir / "docs.parquet").to_pylist()
    status = {Path(d["source"]).name: d["status"] for d in docs}
    assert status == {
        "a.py": "ok",
        "b.py": "ok",
        "c.py": "ok",
        "empty.py": "empty",
        "blob.py": "binary",
        "latin1.py": "not utf-8",
    }

    loaded = tiny_loaded_model(family)
    tok = loaded.tokenizer
    n_layers = len(loaded.parts.blocks) + 1
    kw_ids = sorted(
        {
            tok.encode("def", add_special_tokens=False)[0],
            tok.encode("return", add_special_tokens=False)[0],
            7,
        }
    )
    request = LensRequest(k=5, token_sets=(("kw", torch.tensor(kw_ids)),))
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seen = 0
    for d in docs:
        if d["status"] != "ok":
            assert d["doc"] not in set(rows["doc"].tolist())
            continue
        text = (tmp_path / "corpus" / Path(d["source"]).name).read_text()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert d["n_tokens"] == len(ids)
        want, logits, targets = reference(loaded, ids, bos, request)
        mine = rows["doc"] == d["doc"]
        order = np.lexsort(
            (rows["pos"][mine], rows["layer"][mine])
        )  # layer-major like the reference

        def col(name, _mine=mine, _order=order, _n=len(ids)):
            values = rows[name][_mine][_order]
            if values.dtype == object:
                values = np.stack(values)
            return values.reshape(n_layers, _n, *values.shape[1:])

        assert (col("pos") == np.arange(len(ids))).all()
        assert (col("layer") == np.arange(n_layers)[:, None]).all()
        assert (col("token_id") == np.array(ids)).all()
        assert (col("target_id")[0] == np.array(ids[1:] + [-1])).all()
        for name, mine_v, want_v in [
            ("lse", col("lse"), want.lse),
            ("entropy", col("entropy"), want.entropy),
            ("target_logprob", col("target_logprob"), want.target_logprob),
            ("kl_final", col("kl_final"), want.kl_final),
            ("set_kw", col("set_kw"), want.set_logmass[..., 0]),
            ("topk_logprobs", col("topk_logprobs"), want.topk_logprobs),
            ("ahead_logprob", col("ahead_logprob"), want.ahead_logprob),
        ]:
            a, b = torch.from_numpy(np.asarray(mine_v, dtype=np.float32)), want_v
            assert torch.equal(a.isnan(), b.isnan()), name
            err = (a - b).abs().nan_to_num(0).max().item()
            assert err < 1e-4, f"{family} {name}: max error {err:.2e}"
        # Ranks: exact up to logits within float32 error of the target's (a tiny random model
        # can put two logits 1e-6 apart).
        lo, hi = rank_bounds(logits, targets, 1e-4)
        ranks = np.concatenate([col("target_rank")[..., None], col("ahead_rank")], axis=-1)
        assert ((lo <= ranks) & (ranks <= hi)).all(), f"{family}: a rank beyond float32 ties"
        assert (hi - lo).mean() < 1.0  # the bound is not vacuous: under one tie per row
        assert (col("topk_ids") == want.topk_ids.numpy()).all()
        assert col("residual_finite").all()
        seen += 1
    assert seen == 3


def test_windows_emit_each_position_once_with_carried_context(
    tiny_model_dir, tiny_loaded_model, tmp_path, write_corpus, job_spec, read_rows
):
    model_dir = tiny_model_dir("llama")
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(12))
    corpus = write_corpus(tmp_path / "corpus", {"long.py": text})
    tokens = {"window": 32, "overlap": 8}
    spec = job_spec(model_dir, corpus, tmp_path / "run", JOB, tokens=tokens)
    run_job(spec, show_progress=False)
    rows = read_rows(tmp_path / "run")
    loaded = tiny_loaded_model("llama")
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_layers = len(loaded.parts.blocks) + 1
    keys = set(zip(rows["doc"].tolist(), rows["pos"].tolist(), rows["layer"].tolist(), strict=True))
    assert len(keys) == len(rows["doc"]) == len(ids) * n_layers, (
        "each (doc, pos, layer) exactly once"
    )
    # Window 2 emits positions 31+23 = 54.. with 8 carried tokens: check it against that input.
    bos = loaded.tokenizer.bos_token_id
    first, n_emit = 31 + 23, 23
    window = ids[first - 8 : first + n_emit]
    with torch.no_grad():
        logits = (
            loaded.model(torch.tensor([[bos] + window]), use_cache=False).logits[0, 9:].double()
        )
    want = torch.log_softmax(logits, -1)
    last = rows["layer"] == n_layers - 1
    sel = last & (rows["pos"] >= first) & (rows["pos"] < first + n_emit)
    order = np.argsort(rows["pos"][sel])
    tgt = np.array(ids[first + 1 : first + n_emit + 1])
    got = rows["target_logprob"][sel][order][: len(tgt)]
    expect = want[torch.arange(len(tgt)), torch.from_numpy(tgt)].numpy()
    assert np.abs(got - expect).max() < 1e-4


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every result file's mtime and size (the driver lock is bookkeeping: each run takes it)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != LOCK_NAME
    }


def test_resume_after_a_crash_and_finished_rerun_writes_nothing(
    tiny_model_dir, tmp_path, corpus, job_spec, assert_same_rows
):
    spec = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB)
    run_job(spec, show_progress=False)
    run_dir = tmp_path / "run"
    full = pq.read_table(run_dir / "lens")
    manifest = (run_dir / "_manifest.jsonl").read_text().splitlines()
    assert len(manifest) >= 3, "the small shard size gives several shards"

    # Simulate a crash after two shards: later parts and manifest lines never happened, and a
    # torn manifest line was being written.
    for line in manifest[2:]:
        (run_dir / json.loads(line)["file"]).unlink()
    (run_dir / "_manifest.jsonl").write_text("\n".join(manifest[:2]) + '\n{"shard": 2, "fi')
    (run_dir / "summary.json").unlink()
    outcome = run_job(spec, show_progress=False)
    assert outcome.shards_run == len(manifest) - 2
    # The resumed output equals the uninterrupted run, row for row and bit for bit.
    assert_same_rows(pq.read_table(run_dir / "lens"), full)

    before = _snapshot(run_dir)
    assert run_job(spec, show_progress=False).state == "nothing to do"
    assert _snapshot(run_dir) == before, "a finished job's rerun writes nothing"


def test_different_job_refused_and_overwrite_loses_nothing_on_failure(
    tiny_model_dir, tmp_path, corpus, job_spec
):
    spec = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB)
    run_job(spec, show_progress=False)
    other = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB, lens={"k": 3})
    with pytest.raises(RunDirError, match="different job"):
        run_job(other, show_progress=False)
    before = _snapshot(tmp_path / "run")
    broken = job_spec(
        tiny_model_dir("llama"), tmp_path / "nowhere", tmp_path / "run", JOB, lens={"k": 3}
    )
    with pytest.raises(CodelensError, match="matches no file"):
        run_job(broken, overwrite=True, show_progress=False)
    assert _snapshot(tmp_path / "run") == before, "a failing new job must not clear the old results"
    run_job(other, overwrite=True, show_progress=False)
    assert pq.read_table(tmp_path / "run" / "lens").schema.field("topk_ids").type.list_size == 3


def test_summary_agrees_with_the_rows(tiny_model_dir, tmp_path, corpus, job_spec, read_rows):
    spec = job_spec(tiny_model_dir("qwen2"), corpus, tmp_path / "run", JOB)
    run_job(spec, show_progress=False)
    rows = read_rows(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    n_layers = rows["layer"].max() + 1
    final_top1 = {}
    topk = np.stack(rows["topk_ids"])
    for i in np.flatnonzero(rows["layer"] == n_layers - 1):
        final_top1[rows["doc"][i], rows["pos"][i]] = topk[i, 0]
    for entry in summary["layers"]:
        m = rows["layer"] == entry["layer"]
        has = m & (rows["target_id"] >= 0)
        assert entry["count"] == has.sum() and entry["rows"] == m.sum()
        assert np.isclose(
            entry["mean_target_logprob"], rows["target_logprob"][has].mean(), atol=1e-5
        )
        assert np.isclose(entry["top1_accuracy"], (rows["target_rank"][has] == 0).mean())
        assert np.isclose(entry["mean_kl_final"], rows["kl_final"][m].mean(), atol=1e-5)
        assert np.isclose(entry["mean_entropy"], rows["entropy"][m].mean(), atol=1e-5)
        agree = [
            topk[i, 0] == final_top1[rows["doc"][i], rows["pos"][i]] for i in np.flatnonzero(m)
        ]
        assert np.isclose(entry["top1_agreement_final"], np.mean(agree))
        median_rank = np.median(rows["target_rank"][has])
        lo = entry["target_rank_quantiles"]["p50"]
        assert lo <= median_rank < max(1, 2 * lo), "the median lies in the reported log2 bin"
    assert summary["layers"][-1]["top1_agreement_final"] == 1.0
    assert summary["layers"][-1]["mean_kl_final"] == 0.0


def test_selected_layers_and_switched_off_columns(tiny_model_dir, tmp_path, corpus, job_spec):
    lens = {
        "layers": [0, 2],
        "lookahead": [],
        "entropy": False,
        "kl_final": False,
        "token_sets": {},
    }
    spec = job_spec(tiny_model_dir("gpt2"), corpus, tmp_path / "run", JOB, lens=lens)
    run_job(spec, show_progress=False)
    table = pq.read_table(tmp_path / "run" / "lens")
    assert sorted(set(table.column("layer").to_pylist())) == [0, 2]
    for gone in ("entropy", "kl_final", "ahead_logprob", "ahead_rank", "set_kw"):
        assert gone not in table.column_names
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["resolved"]["impl"] == "torch" and job["resolved"]["family"] == "gpt2"
    assert job["resolved"]["dtype"] == "float32" and job["resolved"]["device"] == "cpu"
    assert job["versions"]["torch"] and job["spec"]["lens"]["layers"] == [0, 2]


def test_nonfinite_residual_rows_are_flagged(
    tiny_model_dir, tmp_path, monkeypatch, corpus, job_spec, read_rows
):
    from codelens.engine.run.pipeline import LensPipeline

    original = LensPipeline.capture

    def overflowing(self, batch):
        hidden, routed = original(self, batch)
        hidden = hidden.clone()
        hidden[1:, 3] = torch.inf  # as an fp16 overflow in block 1 would leave it
        return hidden, routed

    monkeypatch.setattr(LensPipeline, "capture", overflowing)
    spec = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB)
    run_job(spec, show_progress=False)
    rows = read_rows(tmp_path / "run")
    bad = ~rows["residual_finite"]
    assert bad.any() and (rows["layer"][bad] >= 1).all()
    assert np.isnan(rows["lse"][bad]).all() and (rows["target_rank"][bad] == -1).all()
    assert np.isfinite(rows["lse"][~bad]).all()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(layer["nonfinite_rows"] for layer in summary["layers"]) == bad.sum()
    assert all(
        layer["mean_entropy"] is None or np.isfinite(layer["mean_entropy"])
        for layer in summary["layers"]
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ({"lens": {"layers": [0, 9]}}, "lens.layers: index 9 is out of range"),
        ({"lens": {"k": 1000}}, "lens.k=1000 is larger than the vocabulary"),
        ({"lens": {"token_sets": {"x": [100000]}}}, "lens.token_sets.x: id 100000 is outside"),
    ],
)
def test_bad_lens_settings_are_named(tiny_model_dir, tmp_path, corpus, job_spec, override, message):
    spec = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB)
    data = spec.model_dump(mode="json")
    data["lens"].update(override["lens"])
    with pytest.raises(CodelensError, match=message):
        run_job(validate_spec(data), show_progress=False)


def test_failed_shard_is_reported_and_only_it_is_retried(
    tiny_model_dir, tmp_path, monkeypatch, corpus, job_spec, read_status, read_manifest
):
    from codelens.engine.run.runner import ShardRunner
    from codelens.workers.job import JobFailedError

    original = ShardRunner.compute

    def poisoned(self, task):
        if task.index == 1:
            raise RuntimeError("poisoned input")
        return original(self, task)

    monkeypatch.setattr(ShardRunner, "compute", poisoned)
    spec = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB)
    with pytest.raises(JobFailedError, match="shard 1: RuntimeError: poisoned input"):
        run_job(spec, show_progress=False)
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and status["failures"][0]["shard"] == 1
    committed = [entry["shard"] for entry in read_manifest(tmp_path / "run")]
    assert 1 not in committed and len(committed) >= 2
    monkeypatch.setattr(ShardRunner, "compute", original)
    outcome = run_job(spec, show_progress=False)
    assert outcome.shards_run == 1
    assert read_status(tmp_path / "run")["state"] == "done"


def test_output_dir_not_writable(tiny_model_dir, tmp_path, corpus, job_spec):
    blocker = tmp_path / "file"
    blocker.write_text("")
    spec = job_spec(tiny_model_dir("llama"), corpus, blocker / "run", JOB)
    with pytest.raises(RunDirError, match="not writable"):
        run_job(spec, show_progress=False)


def test_engine_never_needs_the_network(tiny_model_dir, tmp_path, monkeypatch, corpus, job_spec):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the engine tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    spec = job_spec(tiny_model_dir("mistral"), corpus, tmp_path / "run", JOB)
    assert run_job(spec, show_progress=False).state == "done"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_a_second_driver_on_a_busy_run_directory_is_refused(
    tiny_model_dir, tmp_path, corpus, job_spec
):
    spec = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB)
    (tmp_path / "run").mkdir()
    with DriverLock(tmp_path / "run"):  # as a driver that is running the job holds it
        with pytest.raises(CodelensError, match=r"is being run by pid \d+ on host"):
            run_job(spec, show_progress=False)
        assert not list((tmp_path / "run" / "lens").glob("*.parquet")), "nothing was run"
    assert run_job(spec, show_progress=False).state == "done"


def test_the_lock_of_a_killed_driver_is_taken_over(
    tiny_model_dir, tmp_path, corpus, job_spec, dead_pid
):
    import socket

    (tmp_path / "run").mkdir()
    stale = {"host": socket.gethostname(), "pid": dead_pid, "started": "2026-01-01"}
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(stale))
    spec = job_spec(tiny_model_dir("llama"), corpus, tmp_path / "run", JOB)
    assert run_job(spec, show_progress=False).state == "done"
    assert (tmp_path / "run" / LOCK_NAME).read_text() == "", "released at the end"
