"""`python -m gpt_lightning.compare DIR`: one table and three plots from the runs in DIR (a sweep, or any folder).

Reads what the runs logged (Hydra's `.hydra/config.yaml`, `summary.json`, TensorBoard events); never re-trains.
A run without `summary.json` (killed, crashed, still running) is listed with its status, not dropped.
Writes `comparison.md`, `comparison.csv`, `val_loss.png`, `quality_vs_kv_cache.png`, `decode_vs_kv_groups.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gpt_lightning.errors import UserError
from gpt_lightning.kv_cache import kv_cache_bytes_per_token

COLUMNS = ["run", "status", "attention", "n_head", "kv_groups", "parameters", "best_val_loss", "val_ppl",
           "test_ppl", "train_tokens_per_sec", "decode_tokens_per_sec", "kv_cache_bytes_per_token", "steps"]


def find_runs(root: Path) -> list[Path]:
    """Run directories: those holding a Hydra config, a summary or TensorBoard events."""
    marks = [*root.glob("**/.hydra/config.yaml"), *root.glob("**/summary.json"), *root.glob("**/tb/events.out.*")]
    runs = {m.parent.parent if m.parent.name in (".hydra", "tb") else m.parent for m in marks}
    return sorted(runs)


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in scalars.items()}


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def read_run(run: Path, root: Path) -> dict:
    row: dict = {"run": str(run.relative_to(root)) or "."}
    cfg_file = run / ".hydra" / "config.yaml"
    att, model = {}, {}
    if cfg_file.is_file():  # saved unresolved (mha's kv_groups is ${.n_heads}): resolve what we read
        cfg = OmegaConf.load(cfg_file)
        att = OmegaConf.to_container(cfg.attention, resolve=True) if "attention" in cfg else {}
        model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else {}
    row.update(attention=att.get("type"), n_head=att.get("n_heads"), kv_groups=att.get("kv_groups"))
    scalars = read_scalars(run) if (run / "tb").is_dir() else {}
    curve = scalars.get("val/loss", [])
    summary_file = run / "summary.json"
    if summary_file.is_file():
        s = json.loads(summary_file.read_text())
        row.update(status=s.get("status", "complete"), attention=s["attention_type"], n_head=s["n_head"],
                   kv_groups=s["kv_groups"], parameters=s["parameters"], best_val_loss=s.get("best_val_loss"),
                   test_ppl=s.get("test_ppl"), train_tokens_per_sec=s.get("train_tokens_per_sec"),
                   decode_tokens_per_sec=s.get("decode_tokens_per_sec"),
                   kv_cache_bytes_per_token=s["kv_cache_bytes_per_token"], steps=s.get("global_step"))
    else:
        has_ckpt = any((run / "checkpoints").glob("*.ckpt"))
        row["status"] = "incomplete (no summary; last checkpoint kept)" if has_ckpt else "crashed (no checkpoint)"
        row["best_val_loss"] = min((v for _, v in curve), default=None)
        row["steps"] = max((s for s, _ in scalars.get("train/loss", [])), default=None)
        # ThroughputMonitor: train/device/items_per_sec on one device, train/items_per_sec (all ranks) with DDP
        tput = scalars.get("train/items_per_sec") or scalars.get("train/device/items_per_sec") or []
        row["train_tokens_per_sec"] = tput[-1][1] if tput else None
        if att and model.get("n_embd"):
            row["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(
                model["n_layer"], att["kv_groups"], model["n_embd"] // att["n_heads"])
    row["best_val_loss"] = _finite(row.get("best_val_loss"))
    row["val_ppl"] = math.exp(row["best_val_loss"]) if row["best_val_loss"] is not None else None
    row["val_curve"] = curve
    return row


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


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
                ax.plot(steps, values, marker=".", label=f"{r['run']} ({r['attention']}, G={r['kv_groups']})")
        ax.legend(fontsize=7)

    def quality(ax):
        for r in rows:
            if r.get("kv_cache_bytes_per_token") and r.get("best_val_loss") is not None:
                point = (r["kv_cache_bytes_per_token"], r["best_val_loss"])
                ax.scatter(*point)
                ax.annotate(f"G={r['kv_groups']}", point, fontsize=8, xytext=(4, 4), textcoords="offset points")

    def speed(ax):
        timed = sorted((r for r in rows if r.get("decode_tokens_per_sec")), key=lambda r: r["kv_groups"])
        ax.plot([r["kv_groups"] for r in timed], [r["decode_tokens_per_sec"] for r in timed], marker="o")

    return [
        figure("val_loss.png", curves, xlabel="step", ylabel="val/loss", title="Validation loss"),
        figure("quality_vs_kv_cache.png", quality, log2_x=True, xlabel="KV-cache bytes per token (fp32)",
               ylabel="best val/loss", title="Quality against KV-cache size"),
        figure("decode_vs_kv_groups.png", speed, log2_x=True, xlabel="kv_groups (KV heads)",
               ylabel="decode tokens/s (batch 1, KV cache)", title="Decode speed"),
    ]


def compare(root: Path, out: Path | None = None) -> list[dict]:
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass a sweep folder (outputs/multirun/<date>) or a folder of runs")
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no runs under {root}: expected run directories with .hydra/, tb/ or summary.json")
    out = (out or root).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [read_run(r, root) for r in runs]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_lightning.compare", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a multirun sweep folder or any folder of run directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.dir, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = (args.out or args.dir).expanduser().resolve()
    print((out / "comparison.md").read_text().split("\n\n![")[0])
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv and plots ({len(rows)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
