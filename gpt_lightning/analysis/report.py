"""The comparison of a folder of runs: `comparison.md` (arms, then runs), `comparison.csv` (arms), `runs.csv`
(runs), `report.md` (one finding per arm against the baseline, what more seeds would resolve) and the plots.

Everything is computed, and every bad input refused, before the first file is written: the plots are drawn into a
temporary folder inside the output folder, every table and text is built, and only then is each file moved into
place (a rename, so a reader never sees half a file). Outputs of an earlier compare that this one did not produce
(a decode grid since gone, a conversion study's plots) are removed, so what is in the folder is all current.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gpt_lightning.analysis import decode_by_arm as grid
from gpt_lightning.analysis import plots
from gpt_lightning.analysis.arms import (METRICS, Arm, Metric, complete, group, headline, kv_cache_share, measure,
                                         parameter_share, pick_baseline)
from gpt_lightning.analysis.runs import curve_source_notes, find_runs, parents_of, read_run
from gpt_lightning.analysis.search import search_section
from gpt_lightning.analysis.stats import Difference, Summary, compare_means, finding, runs_needed
from gpt_lightning.common.errors import UserError
from gpt_lightning.common.files import atomic_write_text
from gpt_lightning.measure.decode_grid import plot_grid

RUN_COLUMNS = ["run", "arm", "seed", "status", "attention", "n_head", "kv_groups", "parameters", "mlp_hidden",
               "test_bpb", "best_val_loss", "val_ppl", "test_loss", "test_ppl", "train_tokens_per_sec",
               "decode_tokens_per_sec", "kv_cache_bytes_per_token", "steps", "uptrain_method", "uptrain_alpha"]
ARM_SHAPE_COLUMNS = ["arm", "baseline", "runs", "n", "duplicate_seeds", "attention", "n_head", "kv_groups",
                     "parameters", "mlp_hidden", "kv_cache_bytes_per_token", "uptrain_method", "uptrain_alpha"]
STAT_COLUMNS = ["n", "mean", "std", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high", "p_value"]
POWER, ALPHA = 0.8, 0.05
GRID_PLOTS = ("decode_grid_vs_kv_groups.png", "largest_batch_vs_kv_groups.png")
TEXTS = ("decode_grid.csv", "comparison.csv", "runs.csv", "comparison.md", "report.md")
OUTPUTS = (*TEXTS, *plots.NAMES, *GRID_PLOTS)  # every file compare writes
# What the last compare into a folder wrote (one name a line): the only files a later one removes when it does not
# write them again. A file of the same name that compare did not write (bench's largest_batch_vs_kv_groups.png in a
# bench run's folder, say) is not compare's to delete.
MANIFEST = ".compared-files"


@dataclass
class Comparison:
    root: Path
    out: Path
    rows: list[dict]
    arms: list[Arm]
    baseline: Arm
    baseline_note: str
    metric: Metric           # the headline quality metric
    parents: list[str]       # parent runs read from outside the folder (conversion study)
    images: list[str]
    grid: list[dict] = field(default_factory=list)         # the decode grid per arm and cell (analysis.decode_by_arm)
    grid_notes: list[str] = field(default_factory=list)    # evaluate records that could not be read
    ungrouped: list[dict] = field(default_factory=list)    # runs without a config among runs with one: in no arm


def previously_written(out: Path) -> set[str]:
    """The outputs the last compare into `out` wrote (its MANIFEST), limited to names compare writes. A folder a
    compare from before the manifest wrote (a report.md, no manifest): all of compare's names but the grid plots,
    which bench writes too."""
    try:
        listed = (out / MANIFEST).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        return set(OUTPUTS) - set(GRID_PLOTS) if (out / "report.md").is_file() else set()
    except (OSError, UnicodeDecodeError):
        return set()
    return set(listed) & set(OUTPUTS)


# ------------------------------------------------------------------------------------------------ formatting

def _fmt(v) -> str:
    """A table cell; a missing figure is an empty cell, never 0."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _signed(v: float) -> str:
    return f"{v:+,.1f}" if abs(v) >= 100 else f"{v:+.4f}"


def _cell(s: Summary) -> str:
    """mean ± 95% CI half-width (sd), or the single value at n = 1, or empty with no value."""
    if s.mean is None:
        return ""
    if s.half_width is None:
        return _fmt(s.mean)
    return f"{_fmt(s.mean)} ± {_fmt(s.half_width)} (sd {_fmt(s.std)})"


def _diff_cell(d: Difference) -> str:
    if d.diff is None:
        return ""
    if d.ci_low is None:
        return f"{_signed(d.diff)} (no interval)"
    p = "p < 0.001" if d.p_value < 0.001 else f"p = {d.p_value:.2g}"
    return f"{_signed(d.diff)} [{_signed(d.ci_low)}, {_signed(d.ci_high)}], {p}"


def _parameters_cell(arm_or_row) -> str:
    """Parameters, with the MLP width when model.match_params widened it."""
    get = arm_or_row.shape if isinstance(arm_or_row, Arm) else arm_or_row.get
    params, mlp, embd = get("parameters"), get("mlp_hidden"), get("n_embd")
    if params is None:
        return ""
    return f"{params:,} (MLP {mlp:,})" if mlp and embd and mlp != 4 * embd else f"{params:,}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)]


def _csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- tables

def arm_csv_rows(c: Comparison) -> list[dict]:
    out = []
    for arm in c.arms:
        row = {k: arm.shape(k) for k in ARM_SHAPE_COLUMNS[5:]}
        row.update(arm=arm.label, baseline=arm.is_baseline, runs=len(arm.rows), n=arm.n,
                   duplicate_seeds=len(arm.duplicates))
        for m in METRICS:
            s, d = arm.summaries[m.key], arm.diffs.get(m.key)
            row.update({f"{m.key}_n": s.n, f"{m.key}_mean": s.mean, f"{m.key}_std": s.std,
                        f"{m.key}_ci_low": s.ci_low, f"{m.key}_ci_high": s.ci_high})
            if d is not None:
                row.update({f"{m.key}_diff": d.diff, f"{m.key}_diff_ci_low": d.ci_low,
                            f"{m.key}_diff_ci_high": d.ci_high, f"{m.key}_p_value": d.p_value})
        out.append(row)
    return out


def arm_csv_columns() -> list[str]:
    return ARM_SHAPE_COLUMNS + [f"{m.key}_{s}" for m in METRICS for s in STAT_COLUMNS]


NOT_GROUPED = "no readable .hydra/config.yaml: not grouped"


def run_rows(c: Comparison) -> list[dict]:
    """Every run with its arm (empty for an ungrouped run); the status says why a finished run is not counted."""
    arm_of = {r["run"]: a.label for a in c.arms for r in a.rows + a.duplicates}
    ungrouped = {r["run"] for r in c.ungrouped}
    out = []
    for r in c.rows:
        row = {**r, "arm": arm_of.get(r["run"], "")}
        if r.get("duplicate_of"):
            row["status"] = f"{r.get('status')}; duplicate seed, not counted (counted: {r['duplicate_of']})"
        elif r["run"] in ungrouped:
            row["status"] = f"{r.get('status')}; {NOT_GROUPED}"
        out.append(row)
    return out


def not_counted(c: Comparison) -> list[str]:
    """Lines naming the finished runs that are not measurements: seeds an arm already has, runs in no arm."""
    lines = [f"Duplicate seed, not counted: `{r['run']}` (seed {r.get('seed')} of {a.name}; counted instead: "
             f"`{r['duplicate_of']}`, finished later)." for a in c.arms for r in a.duplicates]
    if c.ungrouped:
        names = ", ".join(f"`{r['run']}`" for r in c.ungrouped)
        lines.append(f"Not grouped (no readable .hydra/config.yaml, while other runs have one; not counted): {names}.")
    return lines


def grid_section(c: Comparison) -> list[str]:
    """comparison.md's decode grid (`analysis.decode_by_arm`) and the evaluate records it could not read, if any."""
    if not c.grid and not c.grid_notes:
        return []
    lines = ["## Decode over batch × context", ""]
    if c.grid:
        lines += [grid.grid_intro(c.baseline), "", *_table(*grid.grid_table(c.grid, c.baseline)), ""]
    lines += [f"Not read: {note}." for note in c.grid_notes]
    return lines + ([""] if c.grid_notes else [])


def comparison_md(c: Comparison) -> str:
    lines = [f"# Comparison of {len(c.rows)} runs in {len(c.arms)} arms in `{c.root}`", "",
             f"Baseline: **{c.baseline.name}**, {c.baseline_note}. Each figure is the mean over an arm's finished "
             f"runs (seeds) ± the half-width of its 95% confidence interval, with the sample std (sd); an arm of one "
             f"run shows its single value and has no interval (n = 1). Headline quality: {c.metric.name}.", ""]
    if c.parents:
        lines += [f"Parent run(s) read from the study arms' `init_from`: {', '.join(f'`{p}`' for p in c.parents)}.",
                  ""]
    header = ["arm", "n", "parameters", "KV bytes/token", *(m.name for m in METRICS)]
    body = []
    for arm in c.arms:
        runs = f"{arm.n}" + (f" (+{len(arm.rows) - arm.n} unfinished)" if len(arm.rows) > arm.n else "") + (
            f" (+{len(arm.duplicates)} duplicate seed{'s' * (len(arm.duplicates) > 1)})" if arm.duplicates else "")
        body.append([arm.name + (" (baseline)" if arm.is_baseline else ""), runs, _parameters_cell(arm),
                     _fmt(arm.shape("kv_cache_bytes_per_token")), *(_cell(arm.summaries[m.key]) for m in METRICS)])
    lines += ["## Arms", "", *_table(header, body), ""]
    others = [a for a in c.arms if not a.is_baseline]
    if others:
        header = ["arm", "n vs baseline", *(f"Δ {m.name}" for m in METRICS)]
        body = [[a.name, f"{a.n} vs {c.baseline.n}", *(_diff_cell(a.diffs[m.key]) for m in METRICS)] for a in others]
        lines += [f"## Against the baseline ({c.baseline.name})", "",
                  "Difference of the means (arm − baseline) [95% CI], Welch's t-test p-value.", "",
                  *_table(header, body), ""]
    header = ["run", "arm", "seed", "status", "attention", "kv_groups", "parameters", "test bpb", "best val loss",
              "test loss", "test ppl", "train tokens/s", "decode tokens/s", "KV bytes/token", "steps"]
    body = [[r["run"], r["arm"], "" if r.get("seed") is None else str(r["seed"]), _fmt(r.get("status")), _fmt(r.get("attention")),
             _fmt(r.get("kv_groups")), _parameters_cell(r), *(_fmt(r.get(k)) for k in (
                 "test_bpb", "best_val_loss", "test_loss", "test_ppl", "train_tokens_per_sec",
                 "decode_tokens_per_sec", "kv_cache_bytes_per_token", "steps"))] for r in run_rows(c)]
    lines += grid_section(c)
    lines += ["## Runs", "", *_table(header, body), "",
              "test bpb: bits per UTF-8 byte of the test split (empty for runs from before it was recorded); test ppl "
              "is measured with the best checkpoint (a conversion-study arm: its final weights); KV-cache bytes per "
              "token are fp32 (half in bf16); tokens/s were measured on the machine that trained each run.", ""]
    lines += [*not_counted(c), ""] if not_counted(c) else []
    lines += curve_source_notes(c.rows)
    lines += search_section(c.root)  # each arm's best parameters, when the folder holds a per-arm search
    lines += [f"![{name}]({name})" for name in c.images]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- report.md

def _extra(arm: Arm, baseline: Arm) -> str:
    return ", ".join(x for x in (kv_cache_share(arm, baseline), parameter_share(arm, baseline)) if x)


def what_it_would_take(arm: Arm, baseline: Arm, metric: Metric) -> str | None:
    """Seeds per arm that would resolve an undetected difference of the observed size, from the measured stds."""
    d, a, b = arm.diffs[metric.key], arm.summaries[metric.key], baseline.summaries[metric.key]
    if d.diff is None:
        return None
    if d.ci_low is not None and not d.ci_low <= 0 <= d.ci_high:
        return f"{arm.name}: resolved at n = {d.n_a} vs {d.n_b}; nothing more needed for {metric.name}."
    if a.std is None or b.std is None:
        return (f"{arm.name}: {metric.name} cannot be planned yet: n = {d.n_a} vs {d.n_b}, and a spread needs at "
                f"least 2 runs per arm; run 3 or more seeds per arm to measure it.")
    if a.std == 0 and b.std == 0:
        return f"{arm.name}: {metric.name} shows no spread across seeds; more seeds cannot change the estimate."
    n = runs_needed(a.std, b.std, d.diff, alpha=ALPHA, power=POWER)
    size = f"{_signed(d.diff)} {metric.unit}".rstrip()
    if n is None:
        return (f"{arm.name}: a true {metric.name} difference of {size} would need more than 10,000 seeds per arm "
                f"at the measured spread (sd {_fmt(a.std)} vs {_fmt(b.std)}): indistinguishable in practice.")
    return (f"{arm.name}: a true {metric.name} difference of {size} (the observed one) would be detected with "
            f"{POWER:.0%} power by about **{n} seeds per arm** (two-sided Welch test at {ALPHA:g}, measured sd "
            f"{_fmt(a.std)} vs {_fmt(b.std)}; now n = {d.n_a} vs {d.n_b}).")


def gap_over_training(arms: list[Arm], baseline: Arm) -> list[str]:
    """Each arm's val-loss gap to the baseline at every validation step all their finished runs logged, with its
    95% Welch interval: a gap that grows with the steps says more steps would resolve it; a steady one, more seeds.
    An arm without curves is left out (and named), not allowed to empty the table for the others."""
    def by_step(arm: Arm) -> dict[int, list[float]]:
        curves = [dict(r["val_curve"]) for r in arm.measured if r.get("val_curve")]
        if not curves:
            return {}
        common = set.intersection(*(set(c) for c in curves))
        return {step: [c[step] for c in curves] for step in sorted(common)}

    base = by_step(baseline)
    columns = {arm.name: values for arm in arms if (values := by_step(arm))}
    left_out = [arm.name for arm in arms if arm.name not in columns]
    steps = sorted(set(base).intersection(*(set(v) for v in columns.values()))) if columns else []
    if len(steps) < 2:
        return []
    rows = []
    for step in steps:
        cells = []
        for name, values in columns.items():
            d = compare_means(values[step], base[step])
            cells.append(f"{_signed(d.diff)} ± {_fmt(d.half_width)}" if d.half_width is not None else _signed(d.diff))
        rows.append([str(step), *cells])
    return ["", "### Val-loss gap over training", "",
            f"Mean val loss minus {baseline.name}'s at each validation step (nats/token, ± the 95% Welch half-width): "
            "a gap that widens with the steps would be resolved sooner by longer runs than by more seeds.", "",
            *_table(["step", *columns], rows),
            *(["", f"Left out (no val-loss curve in their finished runs): {', '.join(left_out)}."] if left_out else [])]


def report_md(c: Comparison) -> str:
    m = c.metric
    lines = [f"# Findings: {len(c.arms)} arms, {sum(a.n for a in c.arms)} finished runs in `{c.root}`", "",
             f"Baseline: **{c.baseline.name}** ({c.baseline_note}), n = {c.baseline.n}. Headline: {m.name}"
             + (f" ({m.unit})" if m.unit else "") + ". A difference is stated with its 95% confidence interval "
             "(± half-width) and Welch's p-value; one whose interval holds 0 is reported as no difference detected, "
             "never as a win or a loss.", ""]
    if m.key != "test_bpb":
        lines += ["No finished run recorded test bpb (runs from before bits per byte): the headline falls back to "
                  "best val loss, which is only comparable between runs with the same tokenizer.", ""]
    others = [a for a in c.arms if not a.is_baseline]
    lines += ["## Against the baseline", ""]
    if not others:
        lines += [f"Only one arm ({c.baseline.name}): nothing to compare.", ""]
    for arm in others:
        lines.append(f"- {finding(m.name, arm.name, c.baseline.name, arm.diffs[m.key], m.unit, _extra(arm, c.baseline))}")
        for other in METRICS:
            if other.key != m.key and arm.diffs[other.key].diff is not None:  # the arm and baseline said above
                text = finding(other.name, arm.name, c.baseline.name, arm.diffs[other.key], other.unit)
                lines.append(f"  - {text.removeprefix(f'{arm.name}: ').replace(f' vs {c.baseline.name}', '', 1)}")
    if others:
        lines += ["", "## What it would take", "",
                  f"Seeds per arm for a two-sided Welch test (α = {ALPHA:g}) to detect, with {POWER:.0%} power, a true "
                  f"{m.name} difference as large as the observed one, taking the measured stds as the true ones "
                  "(a planning figure, not a promise):", ""]
        lines += [f"- {line}" for a in others if (line := what_it_would_take(a, c.baseline, m))]
        lines += gap_over_training(others, c.baseline)
    findings = grid.grid_findings(c.grid, c.baseline)
    if findings:
        lines += ["", "## Decode over batch × context", "",
                  "From the runs' `evaluate ... decode.contexts=[...]` records, at the largest batch of the longest "
                  "context each arm shares with the baseline (every cell: comparison.md, decode_grid.csv):", "",
                  *findings]
    unfinished = [r["run"] for r in c.rows if not complete(r)]
    if unfinished:
        lines += ["", f"Not counted (unfinished): {', '.join(f'`{r}`' for r in unfinished)}."]
    if not_counted(c):
        lines += ["", *not_counted(c)]
    lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in c.images), "",
              "Tables: [comparison.md](comparison.md) (arms, then runs), comparison.csv (arms), runs.csv (runs)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- compare

def _read(run: Path, root: Path) -> dict:
    """read_run, and a row naming the reason when even that fails: one bad run never stops the report."""
    try:
        return read_run(run, root)
    except Exception as e:
        return {"run": str(run.relative_to(root)) or ".", "path": run, "config": None,
                "status": f"unreadable ({type(e).__name__}: {e})", "val_curve": [], "curves": "none"}


def check_out(out: Path, given: bool) -> None:
    """Refuse a report folder that cannot be written, before any work: an existing file, a file on the way to it,
    a folder without write permission."""
    what = f"--out {out}" if given else f"the report folder {out} (DIR; --out picks another)"
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"{what} is an existing file, not a folder; pass --out a folder for the report "
                        "(created if missing)")
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise UserError(f"{what} cannot be created: {existing} is a file; pass --out a folder whose parents are "
                        "folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} cannot be written: no write permission in {existing}; pass --out a folder you "
                        "can write to")


def compare(root: Path, out: Path | None = None, baseline: str | None = None) -> Comparison:
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass a sweep folder (outputs/multirun/<date>) or a folder of runs")
    given, out = out is not None, (out or root).expanduser().resolve()
    check_out(out, given)
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no runs under {root}: expected run directories with .hydra/, tb/ or summary.json")
    rows = [_read(r, root) for r in runs]
    parent_dirs = parents_of(rows, set(runs))
    rows += [read_run(p, root) for p in parent_dirs]
    arms, ungrouped = group(rows, root)
    chosen, note = pick_baseline(arms, baseline, root)  # refused here, before anything is written
    measure(arms, chosen)
    c = Comparison(root, out, rows, arms, chosen, note, headline(arms), [r["run"] for r in rows[len(runs):]], [],
                   ungrouped=ungrouped)
    c.grid = grid.grid_rows(arms, chosen)
    c.grid_notes = [f"`{r['run']}` {r['decode_grid_problem']}" for r in rows if r.get("decode_grid_problem")]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".compare-"))
    try:
        c.images = plots.plot(arms, chosen, c.metric, stage)
        if (drawn := grid.plot_rows(c.grid)) is not None:
            c.images += [p.name for p in plot_grid(drawn, grid.budget_rows(arms), stage, names=GRID_PLOTS,
                                                   ylabel="decode tokens/s (mean over the arm's runs)")]
        texts = {"decode_grid.csv": _csv(grid.CSV_COLUMNS, c.grid) if c.grid else None,
                 "comparison.csv": _csv(arm_csv_columns(), arm_csv_rows(c)),
                 "runs.csv": _csv(RUN_COLUMNS, run_rows(c)),
                 "comparison.md": comparison_md(c), "report.md": report_md(c)}
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:  # the folder this call made, if still empty
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    # everything is built: publish, each file by a rename, then drop what an earlier compare left and this did not
    try:
        for name in c.images:
            os.replace(stage / name, out / name)
        for name, text in texts.items():
            if text is not None:
                atomic_write_text(out / name, text)
        written = {*c.images, *(n for n, t in texts.items() if t is not None)}
        for name in previously_written(out) - written:
            (out / name).unlink(missing_ok=True)
        atomic_write_text(out / MANIFEST, "".join(f"{n}\n" for n in sorted(written)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return c
