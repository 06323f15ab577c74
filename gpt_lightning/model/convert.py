"""Weights from elsewhere into our GPT: MHA -> GQA/MQA by pooling KV heads, and Hugging Face GPT-2 checkpoints.

Uptraining (arXiv 2305.13245, section 2.1): the key and value projection heads of each contiguous group are
replaced by their mean (or the group's first head, or a fresh initialisation: section 3.3's comparison); every
other weight is copied. Query head i then reads pooled KV head i // (n_head // G),
the same contiguous grouping SDPA's `enable_gqa` uses.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from gpt_lightning.common.errors import UserError
from gpt_lightning.model.gpt import GPT, GPTConfig


POOL_METHODS = ("mean", "first", "random")


def check_pool_method(method: str, what: str = "method") -> None:
    """Refuse an unknown conversion method in one line, before any weight is touched."""
    if method not in POOL_METHODS:
        raise UserError(f"{what}={method!r} is not a KV-head conversion method; use one of {', '.join(POOL_METHODS)} "
                        f"(mean: average each group's heads, first: keep each group's first head, random: fresh K/V)")


@torch.no_grad()
def pool_kv_heads(model: GPT, kv_groups: int, method: str = "mean") -> GPT:
    """A new GPT with `kv_groups` KV heads built from `model`'s contiguous groups of KV heads (GQA paper, §3.3):

    - mean (default): each new KV head is the mean of its group's heads (the paper's choice, best in its Figure 6);
    - first: each new KV head is its group's first head;
    - random: the K/V projections are freshly initialised (as a new GPT's), the queries and all else copied.
    Every other weight (queries, output projection, MLP, embeddings, LayerNorms) is copied unchanged.
    """
    check_pool_method(method)
    src = model.config
    if kv_groups < 1 or src.n_kv_groups % kv_groups:
        raise UserError(f"cannot pool {src.n_kv_groups} KV heads into kv_groups={kv_groups}: "
                        f"kv_groups must divide {src.n_kv_groups}")
    new = GPT(replace(src, n_kv_groups=kv_groups)).to(next(model.parameters()).device)
    fresh = new.state_dict()  # random: the K/V rows come from here (the global torch RNG, seeded by the run)
    C, hd = src.n_embd, src.head_dim
    per_group = src.n_kv_groups // kv_groups

    def group(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(kv_groups, per_group, hd, *t.shape[1:])  # (G, heads per group, hd, ...)
        return (t.mean(dim=1) if method == "mean" else t[:, 0]).flatten(0, 1)  # (G * hd, ...)

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        # Rows of q | k | v along dim 0; k and v are (G * hd) rows each, head-major.
        q, k, v = t.split([C, src.n_kv_groups * hd, src.n_kv_groups * hd], dim=0)
        if method == "random":
            _, k, v = fresh[name].split([C, kv_groups * hd, kv_groups * hd], dim=0)
        else:
            k, v = group(k), group(v)
        return torch.cat([q, k, v], dim=0)

    state = {name: (convert(name, t) if ".attn.c_attn." in name else t) for name, t in model.state_dict().items()}
    new.load_state_dict(state)
    return new


def _read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin; pass a Hugging Face GPT-2 folder "
                    f"(save_pretrained output)")


@torch.no_grad()
def load_hf_gpt2(path: str | Path, kv_groups: int | None = None) -> GPT:
    """Our GPT from a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin).

    Exact for MHA (kv_groups None or n_head); with fewer kv_groups the KV heads are mean-pooled.
    `transformers` is not needed: the files are read with safetensors / torch.
    """
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"init_from=hf:{path}: no config.json there; pass a Hugging Face GPT-2 folder")
    try:
        hf = json.loads((path / "config.json").read_text())
        shape = {k: int(hf[k]) for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path / 'config.json'} is not a GPT-2 config ({type(e).__name__}: {e}); "
                        f"pass a folder written by GPT2LMHeadModel.save_pretrained") from None
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type={hf.get('model_type')!r}, only gpt2 checkpoints are supported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: activation_function={hf['activation_function']!r}; ours is GELU(tanh)")
    config = GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["n_positions"], n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_kv_groups=shape["n_head"], n_embd=shape["n_embd"])
    model = GPT(config)
    hf_state = {k.removeprefix("transformer."): v for k, v in _read_hf_state(path).items()}
    ours = model.state_dict()
    for name in ours:
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        key = name.removeprefix("transformer.")
        if key not in hf_state:
            raise UserError(f"{path}: tensor {key!r} missing; is this a GPT-2 checkpoint?")
        t = hf_state[key]
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()  # HF GPT-2 stores Conv1D weights as (in, out); nn.Linear wants (out, in)
        if key == "wte.weight":  # pad the vocabulary rows to a multiple of 64
            t = torch.cat([t, t.new_zeros(ours[name].size(0) - t.size(0), t.size(1))])
        if t.shape != ours[name].shape:
            raise UserError(f"{path}: {key} has shape {tuple(t.shape)}, expected {tuple(ours[name].shape)}")
        ours[name].copy_(t)
    if kv_groups is not None and kv_groups != config.n_head:
        model = pool_kv_heads(model, kv_groups)
    return model
