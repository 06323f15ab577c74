"""The benchmark CLI at a tiny shape: every column is produced (no timing assertions)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from gpt_lightning.measure.references import NaiveGPT
from gpt_lightning.training.run_record import RunRecord
from gpt_lightning.model import GPT, GPTConfig


def test_naive_reference_computes_the_same_function():
    """Same weights, same loss: the naive model is a fair reference, not a different network."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_groups=2, n_embd=32)
    ours, naive = GPT(config).eval(), NaiveGPT(config).eval()
    with torch.no_grad():
        naive.wte.weight.copy_(ours.transformer.wte.weight)
        naive.wpe.weight.copy_(ours.transformer.wpe.weight)
        for a, b in zip(ours.transformer.h, naive.blocks):
            C = 32
            w, bias = a.attn.c_attn.weight, a.attn.c_attn.bias
            b.q.weight.copy_(w[:C]); b.q.bias.copy_(bias[:C])
            b.k.weight.copy_(w[C:C + 16]); b.k.bias.copy_(bias[C:C + 16])
            b.v.weight.copy_(w[C + 16:]); b.v.bias.copy_(bias[C + 16:])
            b.proj.load_state_dict(a.attn.c_proj.state_dict())
            b.fc.load_state_dict(a.mlp.c_fc.state_dict())
            b.fc_out.load_state_dict(a.mlp.c_proj.state_dict())
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.no_grad():  # the naive model, like the original project, takes the softmax over all (padded) rows
        padded_loss = F.cross_entropy(ours.lm_head(ours.hidden_states(x)).flatten(0, 1), y.flatten())
    torch.testing.assert_close(naive(x, y), padded_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bench_produces_every_column(tmp_path):
    out = tmp_path / "new" / "folder" / "bench.json"  # created up front
    result = subprocess.run(
        [sys.executable, "-m", "gpt_lightning.bench", "experiment=debug", "bench.steps=1", "bench.warmup_steps=1",
         "bench.repeats=2", "bench.decode_new_tokens=4", "bench.decode_bf16=true", f"bench.json={out}",
         "bench.decode_grid=true", "bench.kv_groups=[1,2,4]", "bench.grid_new_tokens=4", "bench.grid_batch_sizes=[1,2]",
         "bench.grid_contexts=[8,100]", "bench.memory_budget_gb=0.1", "bench.memory_repeats=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    record = RunRecord.load(out)
    assert (record.kind, record.attention, record.kv_groups) == ("bench", "gqa", 2)
    assert record.kv_cache_bytes_per_token * 2 == record.kv_cache_bytes_per_token_mha
    r = record.details
    assert record.train_tokens_per_sec in {s["median"] for s in r["training_tokens_per_sec"].values()}
    train = r["training_tokens_per_sec"]
    assert {"ours fp32", "HF GPT2LMHeadModel fp32 (sdpa)", "naive reference fp32"} <= set(train)
    assert all(s["n"] == 2 and s["min"] <= s["median"] <= s["max"] and s["mfu_measured_peak"] > 0 for s in train.values())
    # each round's MFU against the peaks measured at its start and end: 3 measurements for 2 rounds
    assert len(r["matmul_peak_flops_rounds"]) == 3 and all(p["fp32"] > 0 for p in r["matmul_peak_flops_rounds"])
    assert all(s["mfu_min"] <= s["mfu_measured_peak"] <= s["mfu_max"] for s in train.values())
    assert "MFU min-max" in result.stdout
    decode = r["decode_tokens_per_sec"]
    for b in (1, 8):
        assert {f"ours fp32 b{b}", f"ours bf16 weights b{b}", f"HF generate fp32 b{b}"} <= set(decode)
    assert r["kv_cache_bytes_per_token"] == {"configured": 2 * 2 * 2 * 16 * 4, "mha": 2 * 2 * 4 * 16 * 4}
    assert r["ratios"]["KV cache: configured / MHA"] == 0.5
    assert "train: ours fp32 / HF fp32" in r["ratios"] and "decode b1: ours fp32 / HF fp32" in r["ratios"]
    assert r["matmul_peak_flops"]["fp32"] > 0
    assert "ratios:" in result.stdout and "ours fp32 b1" in result.stdout
    # the issue-11 figures: memory per contender, step breakdown, SDPA path, read limit, decode grid and plots
    assert {"ours fp32", "ours fp32, unfused LM head (before)", "HF GPT2LMHeadModel fp32 (sdpa)"} <= set(r["peak_memory"])
    assert all(m["peak_bytes"] > m["step_bytes"] > 0 for m in r["peak_memory"].values())
    assert all(len(m["runs"]) == 2 and m["step_min_bytes"] <= m["step_bytes"] <= m["step_max_bytes"]
               for m in r["peak_memory"].values())
    assert "median of 2 processes" in result.stdout
    best = "ours bf16-mixed" if "ours bf16-mixed" in train else "ours fp32"  # the record's precision
    assert record.peak_memory_bytes == r["peak_memory"][best]["peak_bytes"]
    assert r["step_breakdown"]["ours fp32"]["step_ms"] > 0 and "matmul" in r["step_breakdown"]["ours fp32"]["groups"]
    assert r["sdpa_path"]["ours fp32"] == "flash_attention (enable_gqa)"
    assert r["read_bandwidth_bytes_per_sec"] > 0
    # decode's linears alone at every grid batch size, for each decode precision, against the limits beside them
    linears = {(row["name"], row["rows"]): row for row in r["decode_linears"]}
    assert set(linears) == {(n, b) for n in ("ours fp32", "ours bf16 weights") for b in (1, 2)}
    for row in linears.values():
        assert row["seconds_per_pass"]["n"] == 2 and row["bound"] in ("read", "matmul")
        f = row["fraction_of_roofline"]
        assert 0 < f["min"] <= f["median"] <= f["max"]
        limit = max(row["weight_bytes"] / row["read_bandwidth_bytes_per_sec"], row["flops_per_pass"] / row["matmul_peak_flops"])
        assert abs(limit / row["seconds_per_pass"]["median"] - f["median"]) < 0.5 * f["median"]  # rounds' limits move
    assert "decode linears alone" in result.stdout and "decode linears b1: ours fp32 / roofline" in result.stdout
    assert set(r["matmul_peak_flops_by_kernel"]["fp32"]) >= {"aten"}
    lim = r["decode_read_limit_b1"]["ours fp32"]
    assert 0 < lim["fraction_of_read_limit_min"] <= lim["fraction_of_read_limit"] <= lim["fraction_of_read_limit_max"]
    assert lim["read_bandwidth_bytes_per_sec"]["n"] == 2  # one bracketing bandwidth per timed round
    assert all(row["read_bandwidth_bytes_per_sec"] > 0 for row in r["decode_grid"])
    cells = {(row["kv_groups"], row["batch"], row["context"]) for row in r["decode_grid"]}
    assert cells == {(g, b, c) for g in (1, 2, 4) for b in (1, 2) for c in (8, 60)}
    assert {(x["kv_groups"], x["context"]) for x in r["decode_grid_budget"]} == {(g, c) for g in (1, 2, 4) for c in (8, 60)}
    assert r["decode_grid_mqa_over_mha"]["bound"] > 1 and "MQA / MHA at batch 2, context 60" in result.stdout
    assert all(row["limited_by"] in ("read", "matmul") and row["fraction_of_roofline"] > 0
               and row["matmul_peak_flops"] > 0 for row in r["decode_grid"])
    assert r["decode_grid_mqa_over_mha"]["roofline_ratio"] > 0 and "roofline ratio" in result.stdout
    assert "decode grid b2 ctx60: MQA / MHA roofline ratio" in r["ratios"]
    assert (out.parent / "decode_vs_kv_groups.png").is_file() and (out.parent / "largest_batch_vs_kv_groups.png").is_file()


def test_each_rounds_mfu_is_against_the_peaks_measured_at_its_start_and_end():
    from gpt_lightning.bench import per_round_mfu

    peaks = [{"bf16": 100.0}, {"bf16": 300.0}, {"bf16": 100.0}]  # round 1 between 100 and 300, round 2 300 and 100
    mfu = per_round_mfu([10.0, 40.0], peaks, "bf16", flops_per_token=4.0)
    assert (mfu["min"], mfu["max"], mfu["n"]) == (40 / 200, 160 / 200, 2)  # rate * flops / mean of its two peaks
    with pytest.raises(ValueError, match="2 rounds need 3 peak measurements"):
        per_round_mfu([10.0, 40.0], peaks[:2], "bf16", 4.0)


def test_bench_refuses_kv_groups_that_do_not_divide_the_heads(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.bench", "experiment=debug", "bench.kv_groups=[1,3]"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: bench.kv_groups=[1, 3]: each must divide")


def test_bench_refuses_an_unusable_json_path_before_timing_anything(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.bench", "experiment=debug",
                             f"bench.json={tmp_path / 'a_file' / 'bench.json'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: bench.json={tmp_path / 'a_file' / 'bench.json'}: cannot create its folder"), last
    assert "Traceback" not in result.stderr and "round 1" not in result.stdout


def test_peak_memory_is_summarised_by_its_median_and_range_over_fresh_processes():
    from gpt_lightning.bench import ratios, summarize_memory

    def run(step):
        return {"peak_bytes": step + 100, "baseline_bytes": 100, "step_bytes": step, "kind": "process peak RSS"}

    ours = summarize_memory([run(300), run(330), run(270)])
    hf = summarize_memory([run(1000), run(1200), run(900)])
    assert (ours["step_bytes"], ours["step_min_bytes"], ours["step_max_bytes"]) == (300, 270, 330)
    assert ours["peak_bytes"] == 400 and len(ours["runs"]) == 3
    r = ratios({"training_tokens_per_sec": {}, "decode_tokens_per_sec": {}, "kv_cache_bytes_per_token":
                {"configured": 1, "mha": 1}, "peak_memory": {"ours fp32": ours, "HF GPT2LMHeadModel fp32 (sdpa)": hf}})
    assert r["peak memory: ours fp32 / HF fp32 (step, above baseline)"] == 0.3
    assert r["peak memory: ours fp32 / HF fp32 (step, highest of ours / lowest of HF)"] == 330 / 900


@pytest.mark.slow
def test_step_memory_takes_its_baseline_after_the_library_code_is_loaded():
    """Building an optimizer imports torch._dynamo (~75 MB of RSS): counted as the step's memory, it would add a
    constant to every contender and pull each ratio towards 1. A fresh process, so the import has not happened."""
    script = (
        "import json, sys\n"
        "from gpt_lightning.measure import step_memory\n"
        "loaded = []\n"
        "rss = step_memory.current_rss\n"
        "step_memory.current_rss = lambda: loaded.append('torch._dynamo' in sys.modules) or rss()\n"
        "print('before', 'torch._dynamo' in sys.modules)\n"
        "step_memory.measure(dict(kind='ours', device='cpu', batch_size=2, steps=1,\n"
        "    config=dict(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_kv_groups=1, n_embd=16),\n"
        "    optim=dict(lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1)))\n"
        "print('at baseline', loaded[0])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["before", "False", "at", "baseline", "True"]
