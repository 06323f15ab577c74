"""The decode grid across arms: what `evaluate decode.contexts=[...]` measured on each run's checkpoint (batch x
context decode tokens/s, bytes read per step, roofline), averaged per arm and set against the baseline arm.

`evaluate` writes the grid into `<run>/checkpoints/<checkpoint>.eval.json` (`details.decode_grid`, the rows of
`gpt_lightning.measure.decode_grid`). A run's figure for a cell is that row's median tokens/s; an arm's is the mean
over its finished runs that measured the cell, with the 95% interval when there are two or more. Against the
baseline each cell gets the speed-up (ratio of the means), the Welch interval of the difference, the bytes-read
bound (the baseline's bytes read per step over the arm's: the speed-up if decode only read) and the roofline ratio
(the arm's roofline tokens/s over the baseline's: the speed-up if both ran at their limit, compute included).
Decode speed does not depend on the weights, only on the shape and the machine: compare arms measured on one
machine.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from gpt_lightning.analysis.arms import Arm
from gpt_lightning.analysis.stats import compare_means, describe
from gpt_lightning.training.run_record import RunRecord

EVAL_SUFFIX = ".eval.json"
CSV_COLUMNS = ["arm", "baseline", "kv_groups", "batch", "context", "n", "tokens_per_sec_mean", "tokens_per_sec_ci_low",
               "tokens_per_sec_ci_high", "tokens_per_sec_std", "speedup_vs_baseline", "diff", "diff_ci_low",
               "diff_ci_high", "p_value", "n_baseline", "bytes_read_per_step", "bytes_read_bound", "roofline_ratio",
               "fraction_of_roofline", "limited_by"]


def eval_records(run: Path) -> list[Path]:
    """The run's evaluate records: `checkpoints/last.eval.json` first, then the others, newest first."""
    found = [p for p in (run / "checkpoints").glob(f"*{EVAL_SUFFIX}") if p.is_file()]
    return sorted(found, key=lambda p: (p.name != f"last{EVAL_SUFFIX}", -p.stat().st_mtime))


def read_eval_grid(run: Path) -> tuple[dict | None, str | None]:
    """(grid, problem): the first evaluate record of the run holding a decode grid, as {"record": its path relative
    to the run, "rows": [...], "budget": [...]}, or None; `problem` names the records before it that could not be
    used (the run itself still counts: at worst its grid is missing). Never raises for a bad record."""
    problems = []
    for path in eval_records(run):
        name = path.relative_to(run)
        try:
            record = RunRecord.load(path)
        except Exception as e:  # RecordError for what load recognises; anything else is as unreadable
            problems.append(f"{name}: {e}")
            continue
        details = record.details
        if record.kind != "evaluate" or not isinstance(details, dict):
            problems.append(f"{name}: not an evaluate record (kind {record.kind!r})" if record.kind != "evaluate"
                            else f"{name}: its details are not an object")
            continue
        rows = details.get("decode_grid")
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            budget = details.get("decode_grid_budget")
            return {"record": str(name), "rows": rows, "kv_groups": record.kv_groups,
                    "budget": budget if isinstance(budget, list) else []}, "; ".join(problems) or None
    return None, "; ".join(problems) or None


def _positive(x) -> float | None:
    """x as a finite positive float, or None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _cells(arm: Arm) -> dict[tuple[int, int], list[dict]]:
    """(batch, context) -> the grid row of each finished run of the arm that measured it: one per run (the first),
    only rows of the run's own kv_groups, with a finite positive speed (a row from another version, or another
    model's, is skipped, not guessed)."""
    cells: dict[tuple[int, int], list[dict]] = {}
    for run in arm.measured:
        grid = run.get("decode_grid") or {}
        kv = run.get("kv_groups") or grid.get("kv_groups")
        seen = set()
        for row in grid.get("rows", []):
            try:
                rate = _positive(row["tokens_per_sec"]["median"])
                b, L = _positive(row["batch"]), _positive(row["context"])
            except (KeyError, TypeError):
                continue
            if None in (b, L, rate) or (kv is not None and row.get("kv_groups") != kv) or (b, L) in seen:
                continue
            seen.add((b, L))
            cells.setdefault((int(b), int(L)), []).append(row)
    return cells


def _mean(rows: list[dict], key: str) -> float | None:
    """The mean of the rows' finite positive `key` values, or None."""
    values = [v for r in rows if (v := _positive(r.get(key))) is not None]
    return statistics.fmean(values) if values else None


def grid_rows(arms: list[Arm], baseline: Arm) -> list[dict]:
    """One row per (arm, batch, context) measured by any finished run: the arm's mean tokens/s with its interval,
    and against the baseline's same cell the speed-up, the difference's Welch interval and the two bounds."""
    base = _cells(baseline)
    out = []
    for arm in arms:
        for (b, L), rows in sorted(_cells(arm).items(), key=lambda kv: (kv[0][1], kv[0][0])):
            rates = [float(r["tokens_per_sec"]["median"]) for r in rows]
            s = describe(rates)
            row = {"arm": arm.name, "baseline": arm.is_baseline, "kv_groups": arm.shape("kv_groups"), "batch": b,
                   "context": L, "n": s.n, "tokens_per_sec_mean": s.mean, "tokens_per_sec_ci_low": s.ci_low,
                   "tokens_per_sec_ci_high": s.ci_high, "tokens_per_sec_std": s.std,
                   "bytes_read_per_step": _mean(rows, "bytes_read_per_step"),
                   "fraction_of_roofline": _mean(rows, "fraction_of_roofline"),
                   "limited_by": _majority([r.get("limited_by") for r in rows])}
            ref = base.get((b, L))
            if ref and not arm.is_baseline:
                ref_rates = [float(r["tokens_per_sec"]["median"]) for r in ref]
                d = compare_means(rates, ref_rates)
                row.update(speedup_vs_baseline=s.mean / statistics.fmean(ref_rates), diff=d.diff,
                           diff_ci_low=d.ci_low, diff_ci_high=d.ci_high, p_value=d.p_value, n_baseline=len(ref_rates))
                arm_bytes, ref_bytes = row["bytes_read_per_step"], _mean(ref, "bytes_read_per_step")
                if arm_bytes and ref_bytes:
                    row["bytes_read_bound"] = ref_bytes / arm_bytes
                arm_roof, ref_roof = _mean(rows, "roofline_tokens_per_sec"), _mean(ref, "roofline_tokens_per_sec")
                if arm_roof and ref_roof:
                    row["roofline_ratio"] = arm_roof / ref_roof
            out.append(row)
    return out


def _majority(labels: list) -> str | None:
    labels = [x for x in labels if isinstance(x, str)]
    return max(set(labels), key=labels.count) if labels else None


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _times(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}×"


def grid_intro(baseline: Arm) -> str:
    """What comparison.md's decode grid table shows, column by column."""
    return (f"From each run's `evaluate ... decode.contexts=[...]` record; tokens/s is the arm's mean over its runs "
            f"(± 95% CI half-width with 2 or more), × {baseline.name} the ratio of the means, bytes-read bound the "
            "baseline's bytes read per step over the arm's, roofline ratio the arm's roofline tokens/s over the "
            "baseline's (compute included), % of roofline the arm's measured speed over its own roofline (m: bound "
            "by compute, r: by reading). Compare only arms measured on one machine.")


def grid_table(rows: list[dict], baseline: Arm) -> tuple[list[str], list[list[str]]]:
    """(header, body) of comparison.md's decode grid table: one line per cell and arm, by context, batch, kv_groups."""
    header = ["batch", "context", "arm", "n", "tokens/s", f"× {baseline.name}", "bytes-read bound", "roofline ratio",
              "% of roofline"]
    body = []
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"], -(r["kv_groups"] or 0))):
        half = (None if r["tokens_per_sec_ci_high"] is None
                else (r["tokens_per_sec_ci_high"] - r["tokens_per_sec_ci_low"]) / 2)
        rate = f"{r['tokens_per_sec_mean']:,.0f}" + (f" ± {half:,.0f}" if half is not None else "")
        bound = {"read": " r", "matmul": " m"}.get(r.get("limited_by"), "")
        pct = _num(r.get("fraction_of_roofline"), ".0%")
        body.append([str(r["batch"]), str(r["context"]), r["arm"] + (" (baseline)" if r["baseline"] else ""),
                     str(r["n"]), rate, *(_times(r.get(k)) for k in ("speedup_vs_baseline", "bytes_read_bound",
                                                                      "roofline_ratio")),
                     pct + (bound if pct else "")])
    return header, body


def grid_findings(rows: list[dict], baseline: Arm) -> list[str]:
    """report.md's lines: each arm against the baseline at the largest batch of the longest context both measured,
    stated as the report states every difference (an interval holding 0 is no difference detected)."""
    lines = []
    for arm in dict.fromkeys(r["arm"] for r in rows if "speedup_vs_baseline" in r):
        cells = [r for r in rows if r["arm"] == arm and "speedup_vs_baseline" in r]
        r = max(cells, key=lambda r: (r["context"], r["batch"]))
        where = f"at batch {r['batch']}, context {r['context']}"
        bounds = ", ".join(x for x in (
            f"bytes-read bound {r['bytes_read_bound']:.2f}×" if r.get("bytes_read_bound") else "",
            f"roofline ratio {r['roofline_ratio']:.2f}×" if r.get("roofline_ratio") else "") if x)
        n = f"n = {r['n']} vs {r['n_baseline']}"
        if r.get("diff_ci_low") is None:
            verdict = (f"decodes {r['speedup_vs_baseline']:.2f}× {baseline.name}'s tokens/s {where} ({n}, no "
                       f"interval: fewer than 2 runs on a side, or no spread)")
        elif r["diff_ci_low"] <= 0 <= r["diff_ci_high"]:
            verdict = (f"no decode-speed difference detected {where} ({r['speedup_vs_baseline']:.2f}×, difference "
                       f"{r['diff']:+,.0f} tokens/s, 95% CI {r['diff_ci_low']:+,.0f} to {r['diff_ci_high']:+,.0f}, "
                       f"{n})")
        else:
            p = "p < 0.001" if r["p_value"] < 0.001 else f"p = {r['p_value']:.2g}"
            verdict = (f"decodes {r['speedup_vs_baseline']:.2f}× {baseline.name}'s tokens/s {where} "
                       f"({r['diff']:+,.0f} ± {(r['diff_ci_high'] - r['diff_ci_low']) / 2:,.0f} tokens/s, {p}, {n})")
        lines.append(f"- {arm}: {verdict}" + (f"; {bounds}" if bounds else "") + ".")
    return lines


def budget_rows(arms: list[Arm]) -> list[dict]:
    """The largest-batch-in-budget rows of each arm's first finished run with a grid (they depend on the shape
    and the budget only), or none when the arms' records used different budgets or a row lacks a figure."""
    out = []
    for arm in arms:
        grid = next((r["decode_grid"] for r in arm.measured if r.get("decode_grid")), None)
        out += (grid or {}).get("budget", [])
    complete = all(isinstance(b, dict) and isinstance(b.get("kv_groups"), int) and _positive(b.get("context"))
                   and isinstance(b.get("largest_batch"), int) and _positive(b.get("budget_gb")) for b in out)
    return out if complete and len({b["budget_gb"] for b in out}) == 1 else []


def plot_rows(rows: list[dict]) -> list[dict] | None:
    """The arms' cells in the shape `measure.decode_grid.plot_grid` draws (one point per kv_groups), or None when
    two arms share a kv_groups (e.g. learning-rate arms): a line against kv_groups would then mix them."""
    arms_by_kv: dict = {}
    for r in rows:
        arms_by_kv.setdefault(r["kv_groups"], set()).add(r["arm"])
    if not rows or None in arms_by_kv or any(len(a) > 1 for a in arms_by_kv.values()):
        return None
    return [{"kv_groups": r["kv_groups"], "batch": r["batch"], "context": r["context"],
             "tokens_per_sec": {"median": r["tokens_per_sec_mean"]}} for r in rows]
