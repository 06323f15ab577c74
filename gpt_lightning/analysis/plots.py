"""The comparison's figures: per arm, means with 95% confidence intervals as error bars, curves as mean ± std bands.

An arm of one run has no interval: its point is drawn without a bar and its curve without a band.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt_lightning.analysis.arms import Arm, Metric
from gpt_lightning.common.files import atomic_file

CI_NOTE = "error bars: 95% CI of the mean over seeds"
# Every PNG `plot` may write (the first three always): a later compare removes those it did not redraw.
NAMES = ("val_loss.png", "quality_vs_kv_cache.png", "decode_vs_kv_groups.png", "uptrain_alpha.png",
         "uptrain_methods.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(out: Path, name: str, draw, log2_x: bool = False, **labels) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    ax.set(**labels)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_file(out / name) as f:  # a reader (or a kill mid-write) never sees half a PNG
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return name


def _point(arm: Arm, key: str) -> tuple[float | None, float]:
    s = arm.summaries[key]
    return s.mean, s.half_width or 0.0


def band(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over the curves at each step any of them logged; std 0 where one curve has the step."""
    steps = sorted({s for c in curves for s, _ in c})
    at = [dict(c) for c in curves]
    values = [[c[s] for c in at if s in c] for s in steps]
    mean = np.array([np.mean(v) for v in values])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
    return np.array(steps), mean, std


def val_curves(ax, arms: list[Arm]) -> None:
    for arm in arms:
        runs = arm.measured or arm.rows  # a killed arm still shows what it logged
        curves = [r["val_curve"] for r in runs if r.get("val_curve")]
        if not curves:
            continue
        steps, mean, std = band(curves)
        line, = ax.plot(steps, mean, marker=".", label=f"{arm.name} (n = {len(curves)})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def quality_vs_kv_cache(ax, arms: list[Arm], metric: Metric) -> None:
    for arm in arms:
        x, (y, err) = arm.shape("kv_cache_bytes_per_token"), _point(arm, metric.key)
        if x and y is not None:
            ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=4, label=arm.name)


def decode_vs_kv_groups(ax, arms: list[Arm]) -> None:
    for arm in arms:
        x, (y, err) = arm.shape("kv_groups"), _point(arm, "decode_tokens_per_sec")
        if x and y is not None:
            ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=4, label=arm.name)


def _methods(arms: list[Arm]) -> dict[str, list[Arm]]:
    methods: dict[str, list[Arm]] = {}
    for arm in sorted((a for a in arms if a.shape("uptrain_alpha") is not None), key=lambda a: a.shape("uptrain_alpha")):
        methods.setdefault(arm.shape("uptrain_method"), []).append(arm)
    return methods


def quality_vs_alpha(ax, arms: list[Arm], baseline: Arm, metric: Metric) -> None:
    """The GQA paper's Figure 5: quality against the uptraining fraction, one line per conversion method."""
    for method, group in _methods(arms).items():
        points = [(a.shape("uptrain_alpha"), *_point(a, metric.key)) for a in group]
        points = [p for p in points if p[1] is not None]
        if points:
            x, y, err = zip(*points)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=method)
    y, err = _point(baseline, metric.key)
    if y is not None and baseline.shape("uptrain_alpha") is None:
        ax.axhline(y, color="black", linestyle="--", linewidth=1, label=f"{baseline.name} (baseline)")
        if err:
            ax.axhspan(y - err, y + err, color="black", alpha=0.08)


def methods_by_alpha(ax, arms: list[Arm], metric: Metric) -> None:
    """The GQA paper's Figure 6: the conversion methods side by side, a group of bars per alpha."""
    methods = _methods(arms)
    alphas = sorted({a.shape("uptrain_alpha") for group in methods.values() for a in group})
    width = 0.8 / max(1, len(methods))
    for i, (method, group) in enumerate(methods.items()):
        at = {a.shape("uptrain_alpha"): _point(a, metric.key) for a in group}
        xs = [j + i * width for j, alpha in enumerate(alphas) if alpha in at and at[alpha][0] is not None]
        ys = [at[alpha] for alpha in alphas if alpha in at and at[alpha][0] is not None]
        if xs:
            ax.bar(xs, [y for y, _ in ys], width, yerr=[e for _, e in ys], capsize=3, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(alphas))], [f"α = {a:g}" for a in alphas])
    ends = [(s.mean - (s.half_width or 0.0), s.mean + (s.half_width or 0.0))
            for g in methods.values() for a in g if (s := a.summaries[metric.key]).mean is not None]
    if ends:  # bars start near the data (the differences are what matter), error bars whole
        low, high = min(lo for lo, _ in ends), max(hi for _, hi in ends)
        spread = high - low or abs(high) * 0.05 or 1.0
        ax.set_ylim(low - 0.5 * spread, high + 0.5 * spread)


def plot(arms: list[Arm], baseline: Arm, metric: Metric, out: Path) -> list[str]:
    """Write the PNGs into `out`; return their file names."""
    quality = f"{metric.name} ({metric.unit})" if metric.unit else metric.name
    names = [
        _figure(out, "val_loss.png", lambda ax: val_curves(ax, arms), xlabel="step", ylabel="val/loss",
                title="Validation loss: mean ± std over seeds per arm"),
        _figure(out, "quality_vs_kv_cache.png", lambda ax: quality_vs_kv_cache(ax, arms, metric), log2_x=True,
                xlabel="KV-cache bytes per token (fp32)", ylabel=quality,
                title=f"Quality against KV-cache size\n({CI_NOTE})"),
        _figure(out, "decode_vs_kv_groups.png", lambda ax: decode_vs_kv_groups(ax, arms), log2_x=True,
                xlabel="kv_groups (KV heads)", ylabel="decode tokens/s (batch 1, KV cache)",
                title=f"Decode speed\n({CI_NOTE})"),
    ]
    if _methods(arms):
        names += [
            _figure(out, "uptrain_alpha.png", lambda ax: quality_vs_alpha(ax, arms, baseline, metric),
                    xlabel="uptraining fraction α of the parent's steps", ylabel=quality,
                    title=f"Conversion study: quality against α per method\n({CI_NOTE})"),
            _figure(out, "uptrain_methods.png", lambda ax: methods_by_alpha(ax, arms, metric), ylabel=quality,
                    title=f"Conversion methods side by side\n({CI_NOTE})"),
        ]
    return names
