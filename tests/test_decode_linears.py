"""Decode's linears alone against the read and matmul limits: which linears, bytes, FLOPs and the roofline."""

import pytest
import torch

from gpt_lightning.measure.decode_linears import (decode_linears, linear_bytes_and_flops, linears_row,
                                                  measure_decode_linears, time_linears)
from gpt_lightning.model import GPT, GPTConfig


def tiny(bias=True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_groups=2, n_embd=32,
                         bias=bias)).eval()


def test_a_step_runs_four_linears_per_block_and_the_tied_lm_head_once():
    model = tiny()
    linears = decode_linears(model)
    assert len(linears) == 4 * 2 + 1 and linears[-1] is model.lm_head


@pytest.mark.parametrize("bias", [True, False])
def test_bytes_and_flops_count_every_weight_once(bias):
    model = tiny(bias)
    nbytes, flops = linear_bytes_and_flops(model, rows=8)
    weights = 32 * (32 + 2 * 2 * 8) + 32 * 32 + 2 * 32 * 128  # c_attn (G = 2 KV heads of 8), c_proj, MLP
    biases = (32 + 2 * 2 * 8) + 32 + 128 + 32 if bias else 0
    assert nbytes == 4 * (2 * weights + 2 * biases + 128 * 32)  # + the LM head (padded vocabulary 128), no bias
    assert flops == 2 * 8 * (2 * weights + 128 * 32)


def test_the_roofline_is_the_slower_of_reading_and_computing():
    model = tiny()
    nbytes, flops = linear_bytes_and_flops(model, rows=1)
    read_time, compute_time = nbytes / 1e9, flops / 1e9  # at 1 GB/s and 1 GFLOP/s
    row = linears_row("ours", model, 1, [(2 * read_time, 1e9, 1e9), (4 * read_time, 1e9, 1e9)])
    assert read_time > compute_time and row["bound"] == "read"
    assert row["fraction_of_roofline"] == {"median": 0.375, "min": 0.25, "max": 0.5, "n": 2}
    assert row["fraction_of_read_bandwidth"]["max"] == pytest.approx(0.5)
    fast_read = linears_row("ours", model, 1, [(compute_time, 1e9, 1e15)])  # reading is free: compute bounds it
    assert fast_read["bound"] == "matmul" and fast_read["fraction_of_roofline"]["median"] == pytest.approx(1.0)


def test_each_round_is_timed_between_two_measurements_of_both_limits():
    model = tiny()
    calls = []

    def peak(dtype):
        calls.append(("peak", dtype))
        return 1e12

    def bandwidth():
        calls.append(("bandwidth",))
        return 1e11

    rows = measure_decode_linears({"ours fp32": model}, [1, 4], 2, peak, bandwidth, log=lambda *a: None)
    assert [(r["name"], r["rows"]) for r in rows] == [("ours fp32", 1), ("ours fp32", 4)]
    assert calls.count(("peak", torch.float32)) == calls.count(("bandwidth",)) == 2 * 2 * 2  # before + after
    assert all(r["seconds_per_pass"]["n"] == 2 and r["seconds_per_pass"]["min"] > 0 for r in rows)


def test_timing_leaves_the_models_linears_as_they_were():
    model = tiny()
    time_linears(model, rows=2, passes=1)
    assert all("forward" not in m.__dict__ for m in decode_linears(model))  # decode's layout undone
