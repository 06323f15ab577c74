"""The per-arm hyperparameter search's results (`optimization_results.yaml`, written by the per-arm Optuna sweeper)
as a section of the comparison report: each arm's best parameters, best value and trial counts."""

from __future__ import annotations

from pathlib import Path

import yaml

RESULTS = "optimization_results.yaml"


def read_search_results(root: Path) -> list[dict]:
    """One row per arm of every search under `root` (the sweep folder itself or any folder above it)."""
    rows = []
    for path in sorted(root.glob(f"**/{RESULTS}")):
        data = yaml.safe_load(path.read_text()) or {}
        for arm in data.get("arms") or []:
            trials = arm.get("trials") or {}
            rows.append({"search": str(path.parent.relative_to(root)) if path.parent != root else ".",
                         "arm": ", ".join(f"{k}={v}" for k, v in (arm.get("arm") or {}).items()) or "all",
                         "best_params": arm.get("best_params"), "best_value": arm.get("best_value"),
                         "complete": trials.get("complete", 0), "failed": trials.get("fail", 0),
                         "pruned": trials.get("pruned", 0), "best_run": arm.get("best_run"),
                         "objective": data.get("objective")})
    return rows


def _params(params: dict | None) -> str:
    if not params:
        return "— (no trial completed)"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def search_section(root: Path) -> list[str]:
    """Markdown lines for the report (none when there is no search under `root`)."""
    rows = read_search_results(root)
    if not rows:
        return []
    lines = ["## Hyperparameter search: best per arm", "",
             f"Objective (minimised): {rows[0]['objective']}. From `{RESULTS}`; every trial is also a run above.", "",
             "| search | arm | best parameters | best value | trials complete / failed | best run |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['best_value']:.4f}" if isinstance(r["best_value"], (int, float)) else "—"
        lines.append(f"| {r['search']} | {r['arm']} | {_params(r['best_params'])} | {value} | "
                     f"{r['complete']} / {r['failed'] + r['pruned']} | {r['best_run'] or '—'} |")
    return lines + [""]
