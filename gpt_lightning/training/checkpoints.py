"""Our own Lightning checkpoints: the GPT inside one, rebuilt from its saved hyperparameters alone; `init_from` weights
(a checkpoint, or `hf:FOLDER`: a Hugging Face GPT-2 or one of our exports, which comes back exactly)."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.model.convert import check_pool_method, hf_encoding, load_hf_gpt2, pool_kv_heads


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


def init_state_from(init_from: str, target: GPTConfig, encoding: str, method: str = "mean") -> dict[str, torch.Tensor]:
    """Weights for a model of shape `target` from a checkpoint or `hf:FOLDER`.

    KV heads are pooled by `method` (mean, first, random; see `pool_kv_heads`) when the source has more than
    `target.n_kv_groups` (MHA -> GQA/MQA uptraining); positions are cropped when the source has a longer context.
    Any other shape difference is refused, a different MLP width included: a parameter-matched GQA model
    (model.match_params=true) has a wider MLP than its MHA parent, and half-copied MLP weights would be neither
    an uptrained model nor a fresh one.
    """
    check_pool_method(method, "uptrain.method")
    hf = init_from.startswith("hf:")
    path = Path(init_from[3:] if hf else init_from).expanduser()
    if not path.exists():
        raise UserError(f"init_from={init_from}: {path} does not exist; pass a .ckpt file or hf:FOLDER")
    if hf:  # OpenAI's GPT-2 needs the gpt2 tokenizer; our exports record the encoding they were trained with
        if hf_encoding(path) != encoding:
            raise UserError(f"init_from={init_from} needs the {hf_encoding(path)} tokenizer: set "
                            f"data.encoding={hf_encoding(path)} (got {encoding!r})")
        source = load_hf_gpt2(path)
    else:
        source, _ = load_gpt(path)
    src = source.config
    mismatched = [f"{k}={getattr(src, k)} (config: {getattr(target, k)})"
                  for k in ("vocab_size", "n_layer", "n_head", "n_embd", "bias") if getattr(src, k) != getattr(target, k)]
    if target.block_size > src.block_size:
        mismatched.append(f"block_size={src.block_size} (config: {target.block_size})")
    if mismatched:
        raise UserError(f"init_from={init_from} has another model shape: {', '.join(mismatched)}; "
                        f"set the model/attention keys to match it")
    if src.hidden != target.hidden:
        raise UserError(f"init_from={init_from} has an MLP of {src.hidden} units, this model {target.hidden} "
                        f"(model.match_params widens a GQA/MQA MLP): uptraining keeps the parent's MLP, so set "
                        f"model.match_params=false")
    if src.n_kv_groups != target.n_kv_groups:
        if src.n_kv_groups % target.n_kv_groups:
            raise UserError(f"init_from={init_from} has {src.n_kv_groups} KV heads, which cannot be pooled into "
                            f"attention.kv_groups={target.n_kv_groups}; use a divisor of {src.n_kv_groups}")
        source = pool_kv_heads(source, target.n_kv_groups, method)
    state = source.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: target.block_size]
    return state
