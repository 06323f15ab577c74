"""Arms, intervals and tests for a sweep: which runs belong together, and what their differences support.

A sweep trains several arms (kv_groups 1, 2, 4, 8, ...) over several seeds. An arm is the set of runs whose
resolved configs agree on everything but the seed and where files were written; its seeds are repeated
measurements of one setting. Differences between arms are reported with a Welch interval and p-value, and a
difference whose interval holds 0 is reported as "no difference detected at n = ...", never as better or worse:
at 3 seeds a real but small difference and no difference look the same.

Pure functions on plain dicts and lists of floats (numpy + scipy.stats), so they test without runs or torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
from scipy import stats

# Dotted config keys (fnmatch patterns, `*` also crosses dots) that do not make two runs different arms:
DEFAULT_IGNORED = (
    "seed",                                 # what varies inside an arm
    "data.seed",                            # interpolates ${seed}
    "hydra", "hydra.*",                     # Hydra's runtime node: job name/number, overrides, output dir
    "ckpt_path",                            # a resume source, not a setting
    "*dirpath", "*save_dir", "*output_dir",  # where a run writes, different for every run
    "logger.*.save_dir", "callbacks.model_checkpoint.dirpath",  # the same, named (covered by the suffixes)
)

# Report labels: long dotted names that read better short. Any other key is shown as its dotted name.
SHORT_NAMES = {"attention.kv_groups": "kv_groups", "attention.n_heads": "n_heads", "attention.type": "attention",
               "uptrain.method": "method", "uptrain.alpha": "alpha"}

RUNS_NEEDED_CAP = 10_000


# ---------------------------------------------------------------------------------------------------- arms

def flatten(config: Mapping, prefix: str = "") -> dict:
    """{"attention": {"kv_groups": 2}} -> {"attention.kv_groups": 2}; empty dicts and lists stay values."""
    flat = {}
    for k, v in config.items():
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return flat


def _kept(config: Mapping, ignore=DEFAULT_IGNORED) -> dict:
    return {k: v for k, v in flatten(config).items() if not any(fnmatchcase(k, p) for p in ignore)}


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def arm_key(config: Mapping, ignore=DEFAULT_IGNORED) -> str:
    """The config with seed and output paths removed, as canonical JSON: equal keys <=> same arm.

    Works on nested or already-flattened configs (flattening is idempotent).
    """
    return _canon(_kept(config, ignore))


def _show(value) -> str:
    """A value as a label shows it: strings bare unless they would read as a number/bool/null, else JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, sort_keys=True, default=str)


def _order(flat: dict, key: str) -> tuple:
    """Numbers before text, numbers by value, so kv_groups=8 sorts after kv_groups=2."""
    if key not in flat:
        return (2, "")
    v = flat[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v)
    return (1, _show(v))


def arm_label(configs: list[Mapping]) -> dict[str, str]:
    """{arm_key: label} for the arms among `configs`, labels built from only the keys that differ between arms.

    e.g. "kv_groups=1", or "kv_groups=2, model.match_params=true"; a key one arm lacks shows as "unset".
    One arm alone is "all runs". Ordered by the differing values (numerically where they are numbers).
    """
    flats = {arm_key(c): _kept(c) for c in configs}
    keys = sorted({k for f in flats.values() for k in f})
    differing = [k for k in keys if len({_canon(f[k]) if k in f else None for f in flats.values()}) > 1]
    if not differing:
        return {k: "all runs" for k in flats}

    def label(f):
        return ", ".join(f"{SHORT_NAMES.get(k, k)}={_show(f[k]) if k in f else 'unset'}" for k in differing)

    ordered = sorted(flats, key=lambda a: ([_order(flats[a], k) for k in differing], label(flats[a])))
    labels = {a: label(flats[a]) for a in ordered}
    if len(set(labels.values())) < len(labels):  # values that print alike (1 vs 1.0 in a list): keep arms apart
        labels = {a: f"{lab} (arm {i + 1})" for i, (a, lab) in enumerate(labels.items())}
    return labels


def group_into_arms(runs: list[tuple[str, Mapping]]) -> dict[str, list[str]]:
    """[(run name, resolved config)] -> {arm label: [run names]}, arms in label order, runs in input order."""
    keys = [(name, arm_key(config)) for name, config in runs]
    return {lab: [name for name, k in keys if k == key]
            for key, lab in arm_label([config for _, config in runs]).items()}


# ---------------------------------------------------------------------------------------------- statistics

def _finite(values) -> np.ndarray:
    """Drop None and NaN/inf: a crashed run's missing metric is not a measurement."""
    return np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=float)


@dataclass(frozen=True)
class Summary:
    """One arm's metric over its seeds; std and the interval are None below 2 values, mean None at 0."""
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    half_width: float | None
    confidence: float = 0.95


def describe(values: list[float], confidence: float = 0.95) -> Summary:
    """Mean, sample std (ddof=1) and the Student-t interval mean ± t(1-α/2, n-1)·std/√n of the finite values."""
    x = _finite(values)
    n = len(x)
    if n < 2:
        return Summary(n, float(x[0]) if n else None, None, None, None, None, confidence)
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, half, confidence)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with its Welch interval and p-value (None when a side has < 2 values or no spread)."""
    n_a: int
    n_b: int
    mean_a: float | None
    mean_b: float | None
    diff: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    half_width: float | None = None
    p_value: float | None = None
    df: float | None = None
    confidence: float = 0.95


def compare_means(a: list[float], b: list[float], confidence: float = 0.95) -> Difference:
    """Welch: seeds of different arms need not share a variance (MQA may be noisier than MHA).

    se² = s_a²/n_a + s_b²/n_b, df = se⁴ / ((s_a²/n_a)²/(n_a-1) + (s_b²/n_b)²/(n_b-1)),
    interval diff ± t(1-α/2, df)·se; the p-value is scipy's ttest_ind(a, b, equal_var=False), the same test.
    """
    x, y = _finite(a), _finite(b)
    na, nb = len(x), len(y)
    ma, mb = (float(x.mean()) if na else None), (float(y.mean()) if nb else None)
    diff = ma - mb if na and nb else None
    base = dict(n_a=na, n_b=nb, mean_a=ma, mean_b=mb, diff=diff, confidence=confidence)
    if na < 2 or nb < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
        return Difference(**base)
    va, vb = x.var(ddof=1) / na, y.var(ddof=1) / nb
    df = float((va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)))
    half = float(stats.t.ppf((1 + confidence) / 2, df) * math.sqrt(va + vb))
    p = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
    return Difference(**base, ci_low=diff - half, ci_high=diff + half, half_width=half, p_value=p, df=df)


# ------------------------------------------------------------------------------------------------ sentences

def _num(x: float, sign: bool = False) -> str:
    """3 significant figures, but never fewer than 3 decimals below 1 (4 below 0.01): 0.021, 0.0060, 4.12, 123."""
    a = abs(x)
    if 0 < a < 1e-4:
        return f"{x:{'+' if sign else ''}.2g}"
    decimals = 4 if a < 0.01 and a > 0 else 3 if a < 1 else max(0, 2 - math.floor(math.log10(a)))
    return f"{x:{'+' if sign else ''}.{decimals}f}"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def finding(metric: str, arm: str, baseline: str, d: Difference, unit: str = "", extra: str = "") -> str:
    """One report sentence for `arm` vs `baseline` on `metric`: a signed difference ± its CI half-width if the
    interval excludes 0, else "no difference detected at n = ..." with the interval; never "better"/"worse"."""
    u = f" {unit}" if unit else ""
    ns = f"n = {d.n_a} each" if d.n_a == d.n_b else f"n = {d.n_a} vs {d.n_b}"
    if d.diff is None:
        text = f"{arm}: {metric} vs {baseline}: no finite values ({ns})"
    elif d.ci_low is None:
        why = ("single runs" if max(d.n_a, d.n_b) < 2 else "a single run on one side" if min(d.n_a, d.n_b) < 2
               else "no spread on either side")
        text = f"{arm}: {metric} vs {baseline}: {ns}: no interval; diff {_num(d.diff, True)}{u} ({why}, no test possible)"
    elif d.ci_low <= 0 <= d.ci_high:
        text = (f"{arm}: {metric} vs {baseline}: no difference detected at {ns} (diff {_num(d.diff, True)}{u}, "
                f"{d.confidence * 100:g}% CI {_num(d.ci_low, True)} to {_num(d.ci_high, True)}{u}, {_p(d.p_value)})")
    else:
        text = (f"{arm}: {metric} {_num(d.diff, True)} ± {_num(d.half_width)}{u} vs {baseline} "
                f"({_p(d.p_value)}, {ns})")
    return f"{text}; {extra}" if extra else text


# -------------------------------------------------------------------------------------------------- planning

def _welch_power(n: int, var_a: float, var_b: float, delta: float, alpha: float) -> float:
    se = math.sqrt((var_a + var_b) / n)
    df = (n - 1) * (var_a + var_b) ** 2 / (var_a ** 2 + var_b ** 2)
    crit, ncp = stats.t.ppf(1 - alpha / 2, df), abs(delta) / se
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))


def runs_needed(std_a: float, std_b: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Seeds per arm for a two-sided Welch test at level `alpha` to detect a true difference `delta` with `power`.

    With n runs per arm, t = (mean_a - mean_b) / se, se = √((s_a² + s_b²)/n), has Welch
    df = (n-1)(s_a² + s_b²)² / (s_a⁴ + s_b⁴) and, under a true difference delta, is noncentral t with
    λ = |delta| / se. The test rejects when |t| > t(1-α/2, df), so
        power(n) = P(T > t_crit) + P(T < -t_crit),  T ~ nct(df, λ).
    Start at the normal approximation n ≈ (z(1-α/2) + z(power))² (s_a² + s_b²) / delta² and step to the
    smallest n >= 2 with power(n) >= power. None when delta == 0 or n would exceed 10_000.
    The stds are taken as the true ones (e.g. a pilot sweep's describe().std): a planning figure, not a promise.
    """
    if not all(math.isfinite(v) for v in (std_a, std_b, delta)) or std_a < 0 or std_b < 0 or std_a + std_b == 0:
        raise ValueError(f"need finite stds >= 0, not both 0, and a finite delta (got {std_a}, {std_b}, {delta})")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha}, {power}")
    if delta == 0:
        return None
    va, vb = std_a ** 2, std_b ** 2
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    n = min(max(2, math.ceil(z ** 2 * (va + vb) / delta ** 2)), RUNS_NEEDED_CAP)
    while n > 2 and _welch_power(n - 1, va, vb, delta, alpha) >= power:
        n -= 1
    while _welch_power(n, va, vb, delta, alpha) < power:
        if n >= RUNS_NEEDED_CAP:
            return None
        n += 1
    return n
