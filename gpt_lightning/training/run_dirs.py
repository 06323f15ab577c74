"""Where a run's files live, and which checkpoint `ckpt_path=last` means."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from gpt_lightning.common.errors import UserError


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path, outputs_root: Path, show: int = 3) -> str | None:
    """`last` is this run directory's last.ckpt, and only that: resuming another run's checkpoint by accident would
    mix two runs' curves. When there is none, the error lists the newest candidates with the command for each."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        own = run_dir / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        found = sorted(outputs_root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        hint = "; ".join(f"python -m gpt_lightning.train ckpt_path=last hydra.run.dir={p.parent.parent}"
                         for p in found[:show])
        raise UserError(f"ckpt_path=last: no last.ckpt in this run directory ({own.parent}); "
                        + (f"resume one of the newest runs under {outputs_root} with: {hint}" if found
                           else f"nothing to resume under {outputs_root}: train first, or pass ckpt_path=PATH"))
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such file; pass an existing .ckpt, or ckpt_path=last")
    return str(path.resolve())


VALUE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")  # Hydra flags with a value


def pin_ddp_children_to_this_job() -> None:
    """Make Lightning's DDP child processes rejoin this Hydra job's directory, also inside a multirun.

    Lightning starts each extra rank as `python -m gpt_lightning.train <sys.argv[1:]> hydra.run.dir=<run.dir>`.
    Inside `-m`, sys.argv still holds `-m` and the sweep (`kv_groups=1,2`) and run.dir is not the job's
    directory, so every child would start a sweep of its own in the wrong place (the long-standing Hydra +
    Lightning DDP pitfall). Give the children this job's concrete overrides and its output directory instead.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    # Keep flags such as --config-dir; drop -m; give the job's concrete overrides, and force a single run
    # (a config may itself set hydra.mode=MULTIRUN, as experiment=kv_sweep does).
    flags, args = [], sys.argv[1:]
    for i, a in enumerate(args):
        if a.startswith("-") and a not in ("-m", "--multirun"):
            flags.append(a)
            if a in VALUE_FLAGS and i + 1 < len(args):
                flags.append(args[i + 1])
    sys.argv[1:] = [*flags, *hc.overrides.task, "hydra.mode=RUN"]
    OmegaConf.set_readonly(hc, False)
    with open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    OmegaConf.set_readonly(hc, True)


# What Lightning's DDP launcher writes into os.environ when it starts the other ranks.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def one_ddp_job():
    """Leave no DDP state behind for the next multirun job in this process.

    After a DDP job, LOCAL_RANK & co. stay in os.environ, and Lightning then believes an outside launcher
    started this process: the next job would not start its other ranks and would wait for them forever.
    """
    import torch.distributed as dist

    before = {k: os.environ.get(k) for k in DDP_ENV}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
