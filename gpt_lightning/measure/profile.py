"""Where a training step's time goes: torch.profiler over a few steps of a contender, summarised by op and group."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile

from gpt_lightning.model.attention import ATTENTION_SCOPE

# Op-name fragments -> group, first match wins (self time, so a group never counts its children twice). Ops run
# inside an ATTENTION_SCOPE (attention from plain matmuls and a softmax, e.g. CPU bf16 training) count as attention.
GROUPS = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn", "aten::_addmm_activation")),
    ("layernorm + gelu", ("layer_norm", "gelu")),
    ("optimizer + clip", ("adam", "_foreach", "linalg_vector_norm", "clamp")),
    ("softmax (loss)", ("softmax", "amax", "gather", "scatter", "log")),
    ("copies + casts", ("copy_", "_to_copy", "contiguous", "clone")),
)


def group_of(op: str) -> str:
    for group, fragments in GROUPS:
        if any(f in op for f in fragments):
            return group
    return "other"


def group_of_event(event) -> str:
    """`group_of` an op, except that ops run inside attention count as attention: inside an ATTENTION_SCOPE
    (`matmul_attention`), or inside SDPA's own op (its math path: the bmm and softmax CUDA's fp32 GQA can fall back
    to, which would otherwise land in "matmul" and "softmax (loss)"). The math path's backward ops run under autograd
    nodes with no SDPA parent and still count by their own names."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == ATTENTION_SCOPE or "scaled_dot_product" in parent.name:
            return "attention"
        parent = parent.cpu_parent
    return group_of(event.name)


def step_breakdown(contender, steps: int = 2, top: int = 10) -> dict:
    """Profile `steps` training steps of a `TrainContender` (after one untimed step): per-step milliseconds of the
    top ops by self time, and the share of each group of ops."""
    contender.run(1)
    cuda = contender.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        contender.run(steps)
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))]
    self_us = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) for e in events}
    total = sum(self_us.values()) or 1.0
    groups: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith(("aten::", "mkldnn::")):
            group = group_of_event(e)
            groups[group] = groups.get(group, 0.0) + (e.self_device_time_total if cuda else e.self_cpu_time_total)
    ranked = sorted(self_us.items(), key=lambda kv: -kv[1])[:top]
    return {"step_ms": total / steps / 1e3,
            "top_ops": [{"op": op, "ms_per_step": us / steps / 1e3, "share": us / total} for op, us in ranked],
            "groups": {g: us / total for g, us in sorted(groups.items(), key=lambda kv: -kv[1])}}


def format_breakdown(name: str, b: dict) -> str:
    lines = [f"{name}: {b['step_ms']:.0f} ms per step in aten ops; by group: "
             + ", ".join(f"{g} {s:.0%}" for g, s in b["groups"].items())]
    lines += [f"    {o['op']:<44} {o['ms_per_step']:>8.1f} ms {o['share']:>5.0%}" for o in b["top_ops"]]
    return "\n".join(lines)
