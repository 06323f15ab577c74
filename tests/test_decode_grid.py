"""The decode grid (batch x context, per kv_groups), the memory budget, the read limit and the step breakdown."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_train

from gpt_lightning.measure import decode_grid as grid
from gpt_lightning.measure.limits import bracketed, decode_read_limit, read_bandwidth
from gpt_lightning.measure.profile import group_of, step_breakdown
from gpt_lightning.measure.training_speed import TrainContender
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.training.run_record import RunRecord


def tiny(kv_groups=2, **kw) -> GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_groups=kv_groups, n_embd=32) | kw
    return GPT(GPTConfig(**args)).eval()


def test_bytes_read_per_step_are_the_weights_once_plus_every_rows_cache():
    model = tiny(2)
    weights = sum(p.numel() * 4 for p in model.parameters()) - 32 * 32 * 4  # all but the position table
    assert grid.decode_weight_bytes(model) == weights
    per_token = 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 KV heads, head_dim 8, fp32
    assert grid.bytes_read_per_step(model, batch=3, context=10) == weights + 3 * 10 * per_token


def test_largest_batch_fills_the_budget_with_weights_and_cache():
    assert grid.largest_batch(1000, weight_bytes=200, cache_bytes_per_token=4, context=10) == 20
    assert grid.largest_batch(1000, weight_bytes=200, cache_bytes_per_token=4, context=1000) == 0
    assert grid.largest_batch(100, weight_bytes=200, cache_bytes_per_token=4, context=1) == 0


def test_budget_rows_give_mqa_more_rows_than_mha():
    rows = grid.budget_rows([tiny(4), tiny(1)], [16], budget_gb=1e-3)
    by_kv = {r["kv_groups"]: r["largest_batch"] for r in rows}
    assert by_kv[1] > by_kv[4] > 0


def test_contexts_are_capped_to_leave_room_for_the_new_tokens():
    assert grid.effective_contexts([128, 512, 1024, 2048], block_size=1024, new_tokens=32) == [128, 512, 992]


def test_new_tokens_filling_the_block_are_refused_before_any_work(monkeypatch):
    with pytest.raises(ValueError, match="32 new tokens leave no context in block_size=32"):
        grid.effective_contexts([128], block_size=32, new_tokens=32)  # was [0]: an IndexError in the grid's prefill
    from gpt_lightning.common.errors import UserError
    from gpt_lightning.measure import evaluation

    model = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=1, n_head=2, n_kv_groups=1, n_embd=16))
    monkeypatch.setattr(evaluation, "load_checkpoint", lambda path: {})
    monkeypatch.setattr(evaluation, "load_gpt", lambda ckpt, map_location: (model, {}))
    monkeypatch.setattr(evaluation, "data_settings", lambda *a: pytest.fail("the test split was read first"))
    with pytest.raises(UserError, match="decode.grid_new_tokens=32 leaves no context in this checkpoint's "
                                        "block_size=32"):
        evaluation.evaluate_checkpoint("x.ckpt", torch.device("cpu"), {}, 4, 4, [1], 1, contexts=[16],
                                       grid_new_tokens=32)


def test_prefilled_cache_holds_the_prefill_of_every_row():
    model = tiny(2)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 100, (1, 12))
    cache, first = grid.prefilled_cache(model, batch=3, context=10, new_tokens=4, generator=g, prompt=prompt)
    ref = model.new_cache(3)
    with torch.no_grad():
        h = model.hidden_states(prompt[:, :10].expand(3, -1), ref)
    assert cache.length == 10 and cache.k[0].shape == (3, 2, 14, 8)
    for got, want in zip(cache.k + cache.v, ref.k + ref.v):
        torch.testing.assert_close(got[:, :, :10], want[:, :, :10], atol=1e-5, rtol=1e-5)
    assert torch.equal(first, model.lm_head(h[:, -1])[:, :100].argmax(-1))


def test_grid_rows_cover_every_model_batch_and_context():
    models = [tiny(4), tiny(2), tiny(1)]
    rows = grid.decode_grid(models, [1, 3], [8, 100], new_tokens=4, repeats=2, bandwidth=1e10, log=lambda s: None)
    assert {(r["kv_groups"], r["batch"], r["context"]) for r in rows} == {
        (g, b, c) for g in (4, 2, 1) for b in (1, 3) for c in (8, 28)}
    for r in rows:
        t = r["tokens_per_sec"]
        assert t["n"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
        assert r["kv_cache_bytes"] == r["batch"] * r["context"] * 2 * 2 * r["kv_groups"] * 8 * 4
        assert r["bytes_read_per_step"] == r["weight_bytes"] + r["kv_cache_bytes"]
        assert r["fraction_of_read_limit"] == pytest.approx(t["median"] / r["read_limit_tokens_per_sec"])
    ratio = grid.mqa_over_mha(rows, 3, 28)
    mha = next(r for r in rows if (r["attention"], r["batch"], r["context"]) == ("mha", 3, 28))
    mqa = next(r for r in rows if (r["attention"], r["batch"], r["context"]) == ("mqa", 3, 28))
    assert ratio["bound"] == mha["bytes_read_per_step"] / mqa["bytes_read_per_step"] > 1


def test_grid_measures_the_bandwidth_beside_every_round_and_cell_and_divides_each_round_by_its_own():
    calls = iter(range(1, 100))
    probe = lambda: 1e9 * next(calls)  # noqa: E731  (1, 2, 3, ... GB/s: each bracket has its own mean)
    models = [tiny(4), tiny(1)]
    rows = grid.decode_grid(models, [1, 3], [8], new_tokens=4, repeats=1, bandwidth=probe, log=lambda s: None)
    assert next(calls) == 5  # before and after each of the 2 cells, once for both models of the cell
    for r in rows:
        bw = 1.5e9 if r["batch"] == 1 else 3.5e9  # cell (1, 8) is bracketed by calls 1 and 2, cell (3, 8) by 3 and 4
        assert r["read_bandwidth_bytes_per_sec"] == bw
        assert r["fraction_of_read_limit"] == pytest.approx(
            r["tokens_per_sec"]["median"] * r["bytes_read_per_step"] / (r["batch"] * bw))


def test_flops_per_step_count_every_linear_and_attention_over_the_context():
    model = tiny(2)  # 2 layers, 4 heads of 8, n_embd 32, vocab 100 (padded to 128)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == 2 * (32 * (32 + 2 * 2 * 8) + 32 * 32 + 2 * 32 * 128) + 128 * 32  # blocks + the LM head once
    assert grid.flops_per_step(model, batch=3, context=10) == 2 * 3 * linear + 4 * 3 * 2 * 4 * 8 * 11


def test_roofline_is_the_slower_of_reading_and_computing():
    assert grid.roofline_tokens_per_sec(4, bytes_read=1e6, flops=1e6, bandwidth=1e9, peak=1e12) == 4000  # read
    assert grid.roofline_tokens_per_sec(4, bytes_read=1e6, flops=1e10, bandwidth=1e9, peak=1e12) == 400  # matmul


def test_grid_rows_carry_the_roofline_and_mqa_over_mha_its_bound(monkeypatch):
    models = [tiny(4), tiny(1)]
    peaks = iter([1e9, 3e9, 5e9, 7e9])  # 2 rounds, measured before and after each: 2e9 and 6e9 FLOP/s
    round_rates = iter([100.0] * 8)  # 4 timings per round (2 models x 2 batch sizes), the same in both rounds
    monkeypatch.setattr(grid, "time_decode_at", lambda *a, **k: next(round_rates))
    rows = grid.decode_grid(models, [1, 3], [8], new_tokens=4, repeats=2, bandwidth=1e10, log=lambda s: None,
                            peak=lambda: next(peaks))
    assert next(peaks, None) is None  # one measurement before and one after each round, no more
    for r in rows:
        model = models[0] if r["kv_groups"] == 4 else models[1]
        read, flops = r["bytes_read_per_step"], r["flops_per_step"]
        assert flops == grid.flops_per_step(model, r["batch"], r["context"])
        assert r["matmul_peak_flops"] == 4e9  # the median of the rounds' 2e9 and 6e9
        assert r["roofline_tokens_per_sec"] == r["batch"] / max(read / 1e10, flops / 4e9)
        assert r["limited_by"] == ("read" if read / 1e10 >= flops / 4e9 else "matmul")
        # each round against its own peak (2e9, then 6e9), not against the rounds' median peak
        own = [100.0 / grid.roofline_tokens_per_sec(r["batch"], read, flops, 1e10, pk) for pk in (2e9, 6e9)]
        assert r["fraction_of_roofline"] == pytest.approx(sum(own) / 2)
        assert r["fraction_of_roofline"] != pytest.approx(100.0 / r["roofline_tokens_per_sec"])
    assert {r["limited_by"] for r in rows} == {"matmul"}  # at 2-6 GFLOP/s every step is bound by compute
    ratio = grid.mqa_over_mha(rows, 3, 8)
    mha = next(r for r in rows if (r["attention"], r["batch"]) == ("mha", 3))
    mqa = next(r for r in rows if (r["attention"], r["batch"]) == ("mqa", 3))
    assert ratio["roofline_ratio"] == mqa["roofline_tokens_per_sec"] / mha["roofline_tokens_per_sec"]
    text = grid.format_grid(rows, [], ratio)
    assert "% roofline (bound)" in text and f"roofline ratio {ratio['roofline_ratio']:.2f}x" in text
    # without a peak there is no roofline
    monkeypatch.undo()
    plain = grid.decode_grid(models, [1], [8], new_tokens=2, repeats=1, bandwidth=1e10, log=lambda s: None)
    assert all("fraction_of_roofline" not in r for r in plain)
    assert "roofline_ratio" not in grid.mqa_over_mha(plain, 1, 8)


def test_bracketed_takes_the_limit_before_and_after_the_measurement():
    order = []
    limits = iter([10.0, 30.0])
    value, limit = bracketed(lambda: order.append("measure") or 7.0, lambda: order.append("limit") or next(limits))
    assert order == ["limit", "measure", "limit"] and (value, limit) == (7.0, 20.0)


def test_grid_plots_are_written(tmp_path):
    rows = [{"kv_groups": g, "batch": b, "context": 8, "tokens_per_sec": {"median": 10.0 * g * b}}
            for g in (1, 2, 4) for b in (1, 8)]
    budget = [{"kv_groups": g, "context": 8, "largest_batch": 100 // g, "budget_gb": 1.0} for g in (1, 2, 4)]
    paths = grid.plot_grid(rows, budget, tmp_path)
    assert [p.name for p in paths] == ["decode_vs_kv_groups.png", "largest_batch_vs_kv_groups.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_read_bandwidth_and_the_read_limit():
    bw = read_bandwidth(torch.device("cpu"), nbytes=1 << 24, repeats=2)
    assert bw > 1e8
    assert decode_read_limit(bytes_per_step=1e6, bandwidth=1e9, batch_size=4) == 4000


def test_step_breakdown_groups_the_ops_of_a_training_step():
    model = tiny(2).train()
    x = torch.randint(0, 100, (2, 32))
    c = TrainContender("t", model, torch.optim.AdamW(model.parameters()), x, torch.roll(x, -1, 1))
    b = step_breakdown(c, steps=1, top=5)
    assert b["step_ms"] > 0 and len(b["top_ops"]) == 5
    assert sum(b["groups"].values()) == pytest.approx(1.0)


def test_ops_inside_sdpas_math_path_count_as_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import profile

    from gpt_lightning.measure.profile import group_of_event

    q = k = v = torch.randn(2, 4, 16, 8)
    with sdpa_kernel(SDPBackend.MATH), profile() as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    inner = [e for e in prof.events() if e.name in ("aten::bmm", "aten::matmul", "aten::_softmax")]
    assert inner and {group_of_event(e) for e in inner} == {"attention"}  # was "matmul" and "softmax (loss)"


def test_step_breakdown_counts_attention_built_from_matmuls_as_attention():
    model = tiny(2).train()  # CPU bf16 training takes matmul_attention: bmm and softmax, no SDPA op
    x = torch.randint(0, 100, (2, 32))
    c = TrainContender("t", model, torch.optim.AdamW(model.parameters()), x, torch.roll(x, -1, 1),
                       autocast_dtype=torch.bfloat16)
    b = step_breakdown(c, steps=1)
    assert model.transformer.h[0].attn.sdpa_path.startswith("matmul softmax")
    assert b["groups"]["attention"] > 0 and sum(b["groups"].values()) == pytest.approx(1.0)
    assert {"matmul", "attention"} <= set(b["groups"])
    assert group_of("aten::_fused_adamw_") == "optimizer + clip" and group_of("aten::addmm") == "matmul"


@pytest.mark.slow
def test_evaluate_decode_contexts_writes_the_grid_and_the_budget(corpus, tmp_path):
    result = run_train(corpus, tmp_path, "hydra.run.dir=run", "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = subprocess.run([sys.executable, "-m", "gpt_lightning.evaluate", f"ckpt_path={ckpt}", "decode.new_tokens=4",
                          "decode.repeats=1", "decode.batch_sizes=[1,2]", "decode.contexts=[16,64]",
                          "decode.grid_new_tokens=4", "decode.memory_budget_gb=0.5"],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                           "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    r = RunRecord.load(ckpt.with_name("last.eval.json"))
    rows = r.details["decode_grid"]
    assert {(row["batch"], row["context"]) for row in rows} == {(1, 16), (2, 16), (1, 60), (2, 60)}  # block 64
    assert all(row["kv_groups"] == 2 and row["tokens_per_sec"]["median"] > 0 for row in rows)
    assert all(row["fraction_of_roofline"] > 0 and row["flops_per_step"] > 0 for row in rows)  # peak measured too
    budget = r.details["decode_grid_budget"]
    assert [b["context"] for b in budget] == [16, 60] and budget[0]["largest_batch"] > budget[1]["largest_batch"]
    assert "largest batch in 0.5 GB" in out.stdout
    # compare reads the grid evaluate wrote: the run's arm gets the table and the CSV, cell by cell
    from gpt_lightning.analysis.report import compare

    c = compare(tmp_path)
    assert {(g["batch"], g["context"]) for g in c.grid} == {(1, 16), (2, 16), (1, 60), (2, 60)}
    assert all(g["n"] == 1 and g["fraction_of_roofline"] > 0 and g["limited_by"] for g in c.grid)
    assert "## Decode over batch × context" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "decode_grid.csv").is_file()


def test_evaluate_refuses_bad_contexts():
    out = subprocess.run([sys.executable, "-m", "gpt_lightning.evaluate", "ckpt_path=x.ckpt", "decode.contexts=[0]"],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                           "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: decode.contexts=[0]")
