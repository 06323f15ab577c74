"""Where a run's files live, and which checkpoint `ckpt_path=last` means."""

from __future__ import annotations

from pathlib import Path

from gpt_lightning.errors import UserError


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path, outputs_root: Path) -> str | None:
    """`last` is this run directory's last.ckpt, else the newest last.ckpt under `outputs_root`; a path must exist."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        own = run_dir / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        found = sorted(outputs_root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"ckpt_path=last: no last.ckpt in {own.parent} nor anywhere under {outputs_root}; "
                            f"train first, or pass ckpt_path=PATH")
        return str(found[-1])
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such file; pass an existing .ckpt, or ckpt_path=last")
    return str(path.resolve())
