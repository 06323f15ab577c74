"""The per-arm hyperparameter search's results (`optimization_results.yaml`, written by the per-arm Optuna sweeper)
as a section of the comparison report: each arm's best parameters, best value and trial counts."""

from __future__ import annotations

from pathlib import Path

import yaml

RESULTS = "optimization_results.yaml"


def read_search(root: Path) -> tuple[list[dict], list[str]]:
    """(rows, notes): one row per arm of every search under `root` (the sweep folder itself or any folder above it);
    a file that cannot be read or is not shaped as the sweeper writes it is a note ("<path>: <reason>"), never an
    error: the rest of the comparison stands without it."""
    rows, notes = [], []
    for path in sorted(root.glob(f"**/{RESULTS}")):
        name = str(path.relative_to(root))
        try:
            data = yaml.safe_load(path.read_text())
            rows += _arm_rows(data, "." if path.parent == root else str(path.parent.relative_to(root)))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}")
        except ValueError as e:  # ill-shaped
            notes.append(f"{name}: {e}")
    return rows, notes


def read_search_results(root: Path) -> list[dict]:
    """The rows of `read_search` (files that cannot be read are left out; `read_search` names them)."""
    return read_search(root)[0]


def _arm_rows(data, search: str) -> list[dict]:
    """The file's rows, or ValueError naming what is not shaped as the per-arm sweeper writes it."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ValueError(f"a mapping with an `arms` list expected, found a {type(data).__name__}")
    arms = data.get("arms") or []
    if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
        raise ValueError("`arms` is not a list of mappings")
    rows = []
    for i, arm in enumerate(arms):
        trials, settings, params = arm.get("trials") or {}, arm.get("arm") or {}, arm.get("best_params")
        for key, value in (("trials", trials), ("arm", settings), ("best_params", params or {})):
            if not isinstance(value, dict):
                raise ValueError(f"arms[{i}].{key} is a {type(value).__name__}, not a mapping")
        counts = {k: trials.get(k, 0) for k in ("complete", "fail", "pruned")}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
            raise ValueError(f"arms[{i}].trials holds a count that is not an integer: {counts}")
        rows.append({"search": search, "arm": ", ".join(f"{k}={v}" for k, v in settings.items()) or "all",
                     "best_params": params, "best_value": arm.get("best_value"),
                     "complete": counts["complete"], "failed": counts["fail"], "pruned": counts["pruned"],
                     "best_run": arm.get("best_run"), "objective": data.get("objective")})
    return rows


def _params(params: dict | None) -> str:
    if not params:
        return "— (no trial completed)"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def search_section(root: Path) -> list[str]:
    """Markdown lines for the report (none when there is no search under `root`)."""
    rows, notes = read_search(root)
    if not rows and not notes:
        return []
    lines = ["## Hyperparameter search: best per arm", ""]
    if rows:
        lines += [f"Objective (minimised): {rows[0]['objective']}. From `{RESULTS}`; every trial is also a run above.",
                  "", "| search | arm | best parameters | best value | trials complete / failed | best run |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            value = f"{r['best_value']:.4f}" if isinstance(r["best_value"], (int, float)) else "—"
            lines.append(f"| {r['search']} | {r['arm']} | {_params(r['best_params'])} | {value} | "
                         f"{r['complete']} / {r['failed'] + r['pruned']} | {r['best_run'] or '—'} |")
        lines.append("")
    lines += [f"Not read: {note}." for note in notes]
    return lines + ([""] if notes else [])
