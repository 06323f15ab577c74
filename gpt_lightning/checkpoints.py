"""Our own Lightning checkpoints: the GPT inside one, rebuilt from its saved hyperparameters alone."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt_lightning.errors import UserError
from gpt_lightning.model import GPT, GPTConfig


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict (weights_only), or one clear error for a missing, truncated or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; pass a .ckpt written by gpt_lightning.train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["hyper_parameters"]["model"], ckpt["state_dict"]
    except Exception as e:  # not a torch file, truncated, or another project's checkpoint
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(f"{path} is not a gpt_lightning checkpoint ({type(e).__name__}: {reason}); "
                        f"pass a .ckpt written by gpt_lightning.train") from None
    return ckpt


def load_gpt(path_or_ckpt: str | Path | dict, map_location="cpu") -> tuple[GPT, dict]:
    """(GPT in eval mode, hyperparameters) from a checkpoint path, or a checkpoint dict already loaded."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    hparams = ckpt["hyper_parameters"]
    model = GPT(GPTConfig(**hparams["model"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(map_location).eval(), hparams
