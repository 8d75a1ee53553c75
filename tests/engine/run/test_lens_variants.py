"""Lens variants (issue #8): the attention site, the last blocks as decoder, position buckets.

Each variant's rows are checked against a float64 reference built by an independent path: hooks on
the attention module's output and the block's input (not the pre-MLP norm the engine hooks), and a
second full forward of the model whose hidden state entering block L - n is replaced (not the
engine's replay of recorded block arguments).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from codelens.engine.errors import CodelensError
from codelens.engine.model.loading import load_model
from codelens.engine.run.aggregates import bucket_names, position_bucket
from codelens.kernels import LensRequest, lens_stats_from_logits
from codelens.workers.job import run_job

TEXT = (
    "def add(a, b):\n    return a + b\n\n\nclass Stack:\n"
    "    def push(self, x):\n        self.items.append(x)\n"
)


JOB = {
    "tokens": {"window": 128, "overlap": 16},
    "lens": {"k": 3, "lookahead": []},
    "output": {"shard_tokens": 30},
}


@pytest.fixture
def make_spec(write_corpus, job_spec):
    """``make_spec(model_dir, tmp, **lens)``: the job over ``TEXT`` in ``tmp/corpus`` (written
    here) to ``tmp/run``, with ``lens`` laid over ``JOB``'s."""

    def make(model_dir: Path, tmp: Path, **lens):
        corpus = write_corpus(tmp / "corpus", {"a.py": TEXT})
        return job_spec(model_dir, corpus, tmp / "run", JOB, lens=lens)

    return make


def rows_of(rows, site: str, layer: int, n: int) -> dict[str, np.ndarray]:
    sel = (rows["site"] == site) & (rows["layer"] == layer)
    order = np.argsort(rows["pos"][sel])
    out = {k: v[sel][order] for k, v in rows.items()}
    assert (out["pos"] == np.arange(n)).all()
    return out


def stats(loaded, z_layers: list[torch.Tensor], final: torch.Tensor, ids: list[int]):
    n = len(ids)
    targets = torch.tensor([[ids[i + 1] if i + 1 < n else -1] for i in range(n)])
    return lens_stats_from_logits(torch.stack(z_layers), targets, LensRequest(k=3), final)


def assert_close(got: dict[str, np.ndarray], want, j: int, what: str) -> None:
    for name in ("lse", "target_logprob", "kl_final", "entropy"):
        a = torch.from_numpy(got[name].astype(np.float32))
        b = getattr(want, name)[j].float()
        assert torch.equal(a.isnan(), b.isnan()), (what, name)
        err = (a - b).abs().nan_to_num(0).max().item()
        assert err < 1e-4, f"{what} {name}: max error {err:.2e}"
    assert (got["target_rank"] == want.target_rank[j].numpy()).all(), what


def encode(loaded) -> tuple[list[int], torch.Tensor]:
    tok = loaded.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return ids, torch.tensor([[bos] + ids])


ATTN_CASES = {
    # family: (build overrides, attention module, norm applied to its output before the add)
    "llama": ({}, "self_attn", None),
    "gemma2": ({}, "self_attn", "post_attention_layernorm"),
    "gpt_neox": ({"use_parallel_residual": False}, "attention", None),
    # Read by the general rule (no surgery entry): MoE, sandwich norms, latent attention.
    "qwen3_moe": ({}, "self_attn", None),
    "glm4": ({}, "self_attn", "post_self_attn_layernorm"),
    "gemma3_text": ({}, "self_attn", "post_attention_layernorm"),
    "deepseek_v3": ({}, "self_attn", None),
}


@pytest.mark.parametrize("family", sorted(ATTN_CASES))
def test_attn_site_rows_match_an_independent_reference(
    family, tiny_model_dir, tmp_path, make_spec, read_rows
):
    overrides, attn_name, post_norm = ATTN_CASES[family]
    model_dir = tiny_model_dir(family, **overrides)
    run_job(make_spec(model_dir, tmp_path, sites=["block", "attn"]), show_progress=False)
    rows = read_rows(tmp_path / "run")
    assert set(rows["site"]) == {"block", "attn"}

    loaded = load_model(model_dir, dtype="float32", device="cpu")
    ids, inp = encode(loaded)
    blocks, head = loaded.parts.blocks, loaded.parts.head
    block_in: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda m, a, kw, i=i: block_in.__setitem__(
                    i, (a[0] if a else kw["hidden_states"]).clone()
                ),
                with_kwargs=True,
            )
        )
        attn = getattr(block, attn_name)
        handles.append(
            attn.register_forward_hook(
                lambda m, a, out, i=i: attn_out.__setitem__(
                    i, (out[0] if isinstance(out, tuple) else out).clone()
                )
            )
        )
    with torch.no_grad():
        logits = loaded.model(inp, use_cache=False).logits[0, 1:].double()
        for h in handles:
            h.remove()
        z = []
        for i, block in enumerate(blocks):
            a = attn_out[i]
            if post_norm is not None:
                a = getattr(block, post_norm)(a)
            z.append(head.logits((block_in[i] + a)[0, 1:].double(), torch.float64))
    want = stats(loaded, z, logits, ids)
    for layer in range(1, len(blocks) + 1):
        assert_close(
            rows_of(rows, "attn", layer, len(ids)), want, layer - 1, f"{family} attn {layer}"
        )
    # Block rows are unchanged by the extra site; the summary lists the attn rows apart.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [e["layer"] for e in summary["layers"]] == list(range(len(blocks) + 1))
    assert [e["layer"] for e in summary["attn_layers"]] == list(range(1, len(blocks) + 1))
    assert all(e["site"] == "attn" for e in summary["attn_layers"])
    if family == "llama":
        from codelens.engine.analysis.report import build_report

        page = build_report(tmp_path / "run").read_text()
        assert '<section id="sites">' in page and "(attn)" in page
    last_attn = rows_of(rows, "attn", len(blocks), len(ids))
    has = last_attn["target_id"] >= 0
    assert np.isclose(
        summary["attn_layers"][-1]["mean_target_logprob"],
        last_attn["target_logprob"][has].mean(),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "family,overrides,reason",
    [
        ("gpt_neox", {}, "use_parallel_residual"),
        ("codegen", {}, "in parallel"),
        ("cohere", {}, "in parallel"),
        ("olmo2", {}, "post-norm"),
        ("exaone4", {}, "post-norm"),
        ("qwen3_next", {}, "no self-attention .Mamba or linear-attention"),
        ("granitemoehybrid", {}, r"blocks \[0\] have no self-attention"),
    ],
)
def test_attn_site_refused_for_parallel_blocks(
    family, overrides, reason, tiny_model_dir, tmp_path, make_spec
):
    spec = make_spec(tiny_model_dir(family, **overrides), tmp_path, sites=["attn"])
    with pytest.raises(CodelensError, match=f"lens.sites: attn: .*{reason}"):
        run_job(spec, show_progress=False)


def test_decoder_blocks_match_a_second_forward_with_a_replaced_block_input(
    tiny_model_dir, tmp_path, make_spec, read_rows
):
    model_dir = tiny_model_dir("llama", n_layers=3)
    n = 1
    run_job(
        make_spec(model_dir, tmp_path, sites=["block", "attn"], decoder_blocks=n),
        show_progress=False,
    )
    rows = read_rows(tmp_path / "run")
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    ids, inp = encode(loaded)
    model, blocks, head = loaded.model, loaded.parts.blocks, loaded.parts.head
    big_l = len(blocks)
    start = big_l - n

    def through_last_blocks(h: torch.Tensor) -> torch.Tensor:
        """The model's output of block L when the input of block L - n + 1 is replaced by h."""
        got = {}

        def replace(m, a, kw):
            if a:
                return (h, *a[1:]), kw
            return a, {**kw, "hidden_states": h}

        pre = blocks[start].register_forward_pre_hook(replace, with_kwargs=True)
        post = blocks[-1].register_forward_hook(
            lambda m, a, out: got.__setitem__("h", out[0] if isinstance(out, tuple) else out)
        )
        try:
            model(inp, use_cache=False)
        finally:
            pre.remove()
            post.remove()
        return got["h"]

    with torch.no_grad():
        out = model(inp, output_hidden_states=True, use_cache=False)
        logits = out.logits[0, 1:].double()
        z_block = []
        for layer in range(big_l):
            h = out.hidden_states[layer]
            if layer < start:
                h = through_last_blocks(h)
            z_block.append(head.logits(h[0, 1:].double(), torch.float64))
        # attn site l (inside block l): the input of the pre-MLP norm, run through the last block.
        attn_in = {}
        hooks = [
            b.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, i=i: attn_in.__setitem__(i, a[0].clone())
            )
            for i, b in enumerate(blocks)
        ]
        model(inp, use_cache=False)
        for hk in hooks:
            hk.remove()
        z_attn = []
        for layer in range(1, big_l + 1):
            h = attn_in[layer - 1]
            if layer <= start:
                h = through_last_blocks(h)
            z_attn.append(head.logits(h[0, 1:].double(), torch.float64))
    want_block = stats(loaded, [*z_block, logits], logits, ids)
    want_attn = stats(loaded, z_attn, logits, ids)
    for layer in range(big_l + 1):
        assert_close(rows_of(rows, "block", layer, len(ids)), want_block, layer, f"block {layer}")
    for layer in range(1, big_l + 1):
        assert_close(rows_of(rows, "attn", layer, len(ids)), want_attn, layer - 1, f"attn {layer}")
    # The plain lens differs at the decoded layers (it is a different read-out).
    other = tmp_path / "plain"
    run_job(make_spec(tiny_model_dir("llama", n_layers=3), other), show_progress=False)
    plain = rows_of(read_rows(other / "run"), "block", 0, len(ids))["target_logprob"]
    decoded = rows_of(rows, "block", 0, len(ids))["target_logprob"]
    assert not np.allclose(plain, decoded, equal_nan=True)


def test_decoder_blocks_must_leave_a_layer(tiny_model_dir, tmp_path, make_spec):
    spec = make_spec(tiny_model_dir("llama"), tmp_path, decoder_blocks=2)
    with pytest.raises(CodelensError, match="decoder_blocks=2 must be smaller"):
        run_job(spec, show_progress=False)


def test_position_buckets():
    assert position_bucket(np.array([0, 1, 2, 3, 4, 7, 8, 1000, -1])).tolist() == [
        0,
        1,
        2,
        2,
        3,
        3,
        4,
        10,
        -1,
    ]
    assert bucket_names()[:5] == ["0", "1", "2-3", "4-7", "8-15"]


def test_summary_by_position_and_column_agrees_with_the_rows(
    tiny_model_dir, tmp_path, make_spec, read_rows
):
    run_job(make_spec(tiny_model_dir("llama"), tmp_path), show_progress=False)
    rows = read_rows(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    data = TEXT.encode()
    # Column: bytes from the line's start, from the document bytes (not from engine/data/syntax).
    column = np.array([b - (data.rfind(b"\n", 0, b) + 1) for b in rows["byte_start"].tolist()])
    names = bucket_names()
    for kind, values in (("position", rows["pos"]), ("column", column)):
        bucket = position_bucket(values)
        for entry in summary["layers"]:
            groups = entry[f"by_{kind}"]
            m = rows["layer"] == entry["layer"]
            present = sorted(set(bucket[m].tolist()))
            assert list(groups) == [names[b] for b in present], kind
            for b in present:
                g = groups[names[b]]
                sel = m & (bucket == b)
                has = sel & (rows["target_id"] >= 0)
                assert g["rows"] == sel.sum()
                if has.any():
                    assert np.isclose(
                        g["mean_target_logprob"], rows["target_logprob"][has].mean(), atol=1e-5
                    )
                    assert np.isclose(g["top1_accuracy"], (rows["target_rank"][has] == 0).mean())


def _chosen_by_hf(loaded, family: str, inp: torch.Tensor) -> list[torch.Tensor | None]:
    """Per block, the experts each token's router chose, from the router logits transformers
    returns (``output_router_logits``), not from the engine's hooks: top-k of the routing scores
    (softmax for Qwen3-MoE and gpt-oss, whose top-k equals that of the logits; DeepSeek-V3's
    sigmoid plus its correction bias, one expert group here). None for a dense block."""
    model = loaded.model
    with torch.no_grad():
        out = model(inp, use_cache=False, output_router_logits=True)
    if getattr(out, "router_logits", None) is None:  # DeepSeek-V3 in transformers 5.17, e.g.
        pytest.skip(f"transformers {transformers.__version__} gives no router logits for {family}")
    logits = [r for r in out.router_logits if r is not None]
    chosen: list[torch.Tensor | None] = []
    moe = iter(logits)
    for block in loaded.parts.blocks:
        gate = getattr(block.mlp, "gate", None) or getattr(block.mlp, "router", None)
        if gate is None or not type(gate).__name__.endswith("Router"):
            chosen.append(None)
            continue
        z = next(moe).reshape(-1, gate.weight.shape[0]).float()
        scores = z
        if family == "deepseek_v3":
            scores = z.sigmoid() + gate.e_score_correction_bias
        chosen.append(scores.topk(gate.top_k, dim=-1).indices.sort(-1).values)
    return chosen


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_router_topk_rows_hold_the_experts_each_block_chose(
    family, tiny_model_dir, tmp_path, make_spec, read_rows
):
    model_dir = tiny_model_dir(family)
    run_job(
        make_spec(model_dir, tmp_path, router_topk=True, sites=["block", "attn"]),
        show_progress=False,
    )
    rows = read_rows(tmp_path / "run")
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    ids, inp = encode(loaded)
    want = _chosen_by_hf(loaded, family, inp)
    assert any(w is not None for w in want)
    for layer in range(len(loaded.parts.blocks) + 1):
        got = rows_of(rows, "block", layer, len(ids))["router_topk"]
        expected = None if layer == 0 else want[layer - 1]
        if expected is None:  # layer 0 (the embeddings) and dense blocks have no router
            assert all(v is None for v in got), (family, layer)
            continue
        got = np.sort(np.stack(got), axis=-1)
        np.testing.assert_array_equal(got, expected[1:].numpy(), err_msg=f"{family} {layer}")
    assert all(v is None for v in rows["router_topk"][rows["site"] == "attn"])


def test_router_topk_is_refused_for_a_dense_model(tiny_model_dir, tmp_path, make_spec):
    spec = make_spec(tiny_model_dir("llama"), tmp_path, router_topk=True)
    with pytest.raises(CodelensError, match="lens.router_topk: .*no mixture-of-experts router"):
        run_job(spec, show_progress=False)
