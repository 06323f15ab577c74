"""The comparison report of a folder of runs: `comparison.md`, `comparison.csv` and the plots."""

from __future__ import annotations

import csv
from pathlib import Path

from gpt_lightning.analysis.runs import find_runs, read_run
from gpt_lightning.common.errors import UserError

COLUMNS = ["run", "status", "attention", "n_head", "kv_groups", "parameters", "best_val_loss", "val_ppl",
           "test_ppl", "train_tokens_per_sec", "decode_tokens_per_sec", "kv_cache_bytes_per_token", "steps"]


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", " ")  # a reason inside a markdown table cell


def plot(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name: str, draw, log2_x: bool = False, **labels) -> str:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        ax.set(**labels)
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        return name

    def curves(ax):
        for r in rows:
            if r["val_curve"]:
                steps, values = zip(*r["val_curve"])
                ax.plot(steps, values, marker=".",
                        label=f"{r['run']} ({r.get('attention')}, G={r.get('kv_groups')})")
        if ax.lines:  # runs that never validated draw no curve
            ax.legend(fontsize=7)

    def quality(ax):
        for r in rows:
            if r.get("kv_cache_bytes_per_token") and r.get("best_val_loss") is not None:
                point = (r["kv_cache_bytes_per_token"], r["best_val_loss"])
                ax.scatter(*point)
                ax.annotate(f"G={r['kv_groups']}", point, fontsize=8, xytext=(4, 4), textcoords="offset points")

    def speed(ax):
        timed = sorted((r for r in rows if r.get("decode_tokens_per_sec") and isinstance(r.get("kv_groups"), int)),
                       key=lambda r: r["kv_groups"])
        ax.plot([r["kv_groups"] for r in timed], [r["decode_tokens_per_sec"] for r in timed], marker="o")

    return [
        figure("val_loss.png", curves, xlabel="step", ylabel="val/loss", title="Validation loss"),
        figure("quality_vs_kv_cache.png", quality, log2_x=True, xlabel="KV-cache bytes per token (fp32)",
               ylabel="best val/loss", title="Quality against KV-cache size"),
        figure("decode_vs_kv_groups.png", speed, log2_x=True, xlabel="kv_groups (KV heads)",
               ylabel="decode tokens/s (batch 1, KV cache)", title="Decode speed"),
    ]


def _read(run: Path, root: Path) -> dict:
    """read_run, and a row naming the reason when even that fails: one bad run never stops the report."""
    try:
        return read_run(run, root)
    except Exception as e:
        return {"run": str(run.relative_to(root)) or ".", "status": f"unreadable ({type(e).__name__}: {e})",
                "val_curve": []}


def compare(root: Path, out: Path | None = None) -> list[dict]:
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass a sweep folder (outputs/multirun/<date>) or a folder of runs")
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no runs under {root}: expected run directories with .hydra/, tb/ or summary.json")
    out = (out or root).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [_read(r, root) for r in runs]
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS} for r in rows)
    images = plot(rows, out)
    lines = [f"# Comparison of {len(rows)} runs in `{root}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    lines += ["", "val_ppl is exp(best val loss); test_ppl is measured with the best checkpoint; KV-cache bytes per "
              "token are fp32 (half in bf16); tokens/s were measured on the machine that trained each run.", ""]
    lines += [f"![{name}]({name})" for name in images]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    return rows
