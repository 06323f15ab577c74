"""The dense spec-peak table behind every GPU MFU figure (bench, ThroughputMonitor), checked on CPU by mocking the
CUDA device name: the right card, the dense (not sparse) figure, TF32 for fp32 where torch allows it."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from gpt_lightning.measure.limits import card_of, dense_peak, spec_peak
from gpt_lightning.training.callbacks import MFUThroughputMonitor


@pytest.mark.parametrize("name, card", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA A10", "a10"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA L40", "l40"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA A10G", None),            # no NVIDIA datasheet figure: left to Lightning's table
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla T4", None),
])
def test_device_names_map_to_their_card(name, card):
    assert card_of(name) == card


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA H100 NVL", 835.5), ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05),
])
def test_bf16_peak_is_the_dense_datasheet_figure(name, tflops):
    assert dense_peak(name, torch.bfloat16) == pytest.approx(tflops * 1e12)


def test_h200_gets_a_dense_peak_where_lightning_has_none():
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS

    assert not any(key == "nvidia h200" for key in _CUDA_FLOPS)  # why our table exists
    assert dense_peak("NVIDIA H200", torch.bfloat16) == dense_peak("NVIDIA H100 80GB HBM3", torch.bfloat16)


def test_fp32_peak_is_tf32_only_when_torch_allows_tf32_matmuls():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dense_peak("NVIDIA H100 80GB HBM3", torch.float32) == pytest.approx(66.9e12)
        torch.set_float32_matmul_precision("high")
        assert dense_peak("NVIDIA H100 80GB HBM3", torch.float32) == pytest.approx(494.7e12)
    finally:
        torch.set_float32_matmul_precision(saved)


def test_unlisted_dtype_and_cpu_have_no_spec_peak():
    assert dense_peak("NVIDIA H100 80GB HBM3", torch.int8) is None
    assert spec_peak(torch.device("cpu"), torch.bfloat16) is None


def test_spec_peak_prefers_our_table_then_lightnings(monkeypatch):
    import lightning.fabric.utilities.throughput as lightning_throughput

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(lightning_throughput, "get_available_flops", lambda device, dtype: 1.0)
    assert spec_peak(torch.device("cuda", 0), torch.bfloat16) == pytest.approx(989.4e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert spec_peak(torch.device("cuda", 0), torch.bfloat16) == 1.0


def fake_trainer(precision: str, plugin):
    return SimpleNamespace(precision=precision, precision_plugin=plugin, world_size=1, enable_validation=True,
                           strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
                           state=SimpleNamespace(stage=RunningStage.TRAINING))


def test_throughput_monitor_uses_the_dense_peak_on_a_listed_gpu(monkeypatch, recwarn):
    import gpt_lightning.training.callbacks as callbacks

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(callbacks, "matmul_peak", lambda *a, **k: pytest.fail("measured a peak on a listed GPU"))
    monitor = MFUThroughputMonitor(batch_size_fn=len)
    monitor.setup(fake_trainer("bf16-mixed", MixedPrecision("bf16-mixed", "cuda")), None, TrainerFn.FITTING)
    assert monitor.available_flops == pytest.approx(989.4e12)
    assert {t.available_flops for t in monitor._throughputs.values()} == {monitor.available_flops}
    assert not [w for w in recwarn if "FLOPs not found" in str(w.message)]


def test_throughput_monitor_overrides_lightnings_sparse_figure(monkeypatch):
    # Lightning 2.6.6 maps "H100 NVL" to 1978.8 TFLOP/s bf16, the sparse figure of the older two-card datasheet.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    monitor = MFUThroughputMonitor(batch_size_fn=len)
    monitor.setup(fake_trainer("bf16-mixed", MixedPrecision("bf16-mixed", "cuda")), None, TrainerFn.FITTING)
    assert monitor.available_flops == pytest.approx(835.5e12)


def test_throughput_monitor_measures_a_peak_on_an_unlisted_gpu(monkeypatch):
    import gpt_lightning.training.callbacks as callbacks

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(callbacks, "matmul_peak", lambda device, dtype, **k: 123.0)
    monitor = MFUThroughputMonitor(batch_size_fn=len)
    with pytest.warns(UserWarning, match="FLOPs not found"):  # Lightning's own warning stays for unknown cards
        monitor.setup(fake_trainer("32-true", Precision()), None, TrainerFn.FITTING)
    assert monitor.available_flops == 123.0
    assert {t.available_flops for t in monitor._throughputs.values()} == {123.0}


def test_a_cpus_measured_matmul_peak_is_its_best_kernels(monkeypatch):
    """aten's fp32 matmul on a CPU is MKL's (AVX2 only on AMD CPUs); oneDNN's may run twice as fast on the same
    machine. The peak is the best of them, so an MFU is never measured against a slow library."""
    from gpt_lightning.measure import limits
    from gpt_lightning.model.cpu_matmul import onednn_linear_available

    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # bf16/fp16 packing: AVX-512 (or AVX-NE-CONVERT)
        peaks = limits.matmul_peaks(cpu, dtype, n=128, repeats=2)  # an AVX2 CPU raised in oneDNN's bf16 reorder
        assert set(peaks) == ({"aten", "onednn"} if onednn_linear_available(dtype) else {"aten"}), dtype
        assert all(v > 0 for v in peaks.values())
    monkeypatch.setattr(limits, "matmul_peaks", lambda *a, **k: {"aten": 2.0e11, "onednn": 4.8e11})
    assert limits.matmul_peak(cpu, torch.float32) == 4.8e11


def test_onednns_matmul_is_timed_in_full_fp32_precision():
    """Its product must be an fp32 product (no implicit bf16), or the peak would not be one fp32 code can reach."""
    from gpt_lightning.model.cpu_matmul import onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("no oneDNN linear in this torch build")
    torch.manual_seed(0)
    a, b = torch.randn(64, 256), torch.randn(256, 256)
    got = torch.ops.mkldnn._linear_pointwise(a, torch.ops.mkldnn._reorder_linear_weight(b, 64), None, "none", [], "")
    exact = a.double() @ b.double().t()
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5  # bf16 inputs would give ~1e-3


def test_a_slow_cpu_product_is_timed_at_a_smaller_size():
    # Without AVX-512, aten's bf16 product ran 1.2 GFLOP/s: one 2048^3 product took ~15 s, the bench test timed out
    from gpt_lightning.measure.limits import cpu_matmul_n

    assert cpu_matmul_n(torch.float32, enough_s=0.0) == 256  # the first size already takes long enough
    assert cpu_matmul_n(torch.float32, enough_s=float("inf")) == 2048  # never: the full size
    assert cpu_matmul_n(torch.bfloat16, largest=512, enough_s=float("inf")) == 512
