"""Our GPT as a Hugging Face folder (`config.json` + `model.safetensors`): pure torch, safetensors and json.

`transformers` is not needed to export; `AutoModelForCausalLM.from_pretrained(folder)` loads the result.

- MHA -> `GPT2LMHeadModel`, weight for weight.
- GQA -> `GPT2LMHeadModel` with each KV head's projection repeated to its group of n_head // G query heads.
  Exact: query head i reads KV head i // (n_head // G) in our model, and its own copy of that head in GPT-2.
  HF's KV cache then holds n_head heads (the memory saving is lost there, not the numbers).
- MQA -> `GPTBigCodeForCausalLM` with `multi_query=true` (architecture=auto): the same fused q | k | v
  projection with one KV head, so the weights are copied as they are and HF's KV cache keeps one head.
  `architecture=gpt2` repeats the single head instead, for tools that know only GPT-2.

GPT-2 always has biases: a `bias=False` model is written with zero biases (the same function). Our shape is also
stored under `config.json["gpt_lightning"]`, so `load_hf` (init_from=hf:DIR) rebuilds the original model exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from gpt_lightning.common.errors import UserError
from gpt_lightning.model.convert import META_KEY
from gpt_lightning.model.gpt import GPT, GPTConfig

ARCHITECTURES = ("auto", "gpt2", "gpt_bigcode")
# GPTConfig fields with a Hugging Face equivalent; any other field must keep its default to be exportable.
EXPRESSIBLE = {"vocab_size", "block_size", "n_layer", "n_head", "n_kv_groups", "n_embd", "dropout", "bias",
               "mlp_hidden"}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "gpt_bigcode": "GPTBigCodeForCausalLM"}


def check_architecture(architecture: str) -> None:
    """Refuse an unknown architecture name in one line (before a checkpoint is loaded)."""
    if architecture not in ARCHITECTURES:
        raise UserError(f"architecture={architecture!r} is not one of {', '.join(ARCHITECTURES)}")


def resolve_architecture(config: GPTConfig, architecture: str = "auto") -> str:
    """`gpt2` or `gpt_bigcode` for this shape, or one line saying why Hugging Face cannot express it."""
    check_architecture(architecture)
    for f in fields(config):  # a feature GPT-2 lacks (say, another position scheme) cannot be exported silently
        if f.name not in EXPRESSIBLE and getattr(config, f.name) != f.default:
            raise UserError(f"cannot export: {f.name}={getattr(config, f.name)!r} has no Hugging Face GPT-2 "
                            f"equivalent; only the default ({f.default!r}) can be written")
    if architecture == "auto":
        return "gpt_bigcode" if config.n_kv_groups == 1 and config.n_head > 1 else "gpt2"
    # We write GPTBigCode with multi_query=true only: its fused c_attn is q | one k | one v. Its MHA form
    # (multi_query=false) interleaves q, k, v per head, a different layout neither we nor this writer handle.
    if architecture == "gpt_bigcode" and config.n_kv_groups != 1:
        raise UserError(f"cannot export kv_groups={config.n_kv_groups} (of {config.n_head} heads) as gpt_bigcode: "
                        f"it is written with one KV head (multi_query, MQA only); use architecture=gpt2 "
                        f"({'weights as they are' if config.n_kv_groups == config.n_head else 'KV heads repeated'},"
                        f" exact)")
    return architecture


def _mlp_hidden(config: GPTConfig) -> int:
    return getattr(config, "mlp_hidden", None) or 4 * config.n_embd


def hf_config(config: GPTConfig, architecture: str, eot_token: int | None, encoding: str) -> dict:
    """config.json for `architecture` (resolved: gpt2 or gpt_bigcode)."""
    eot = eot_token if eot_token is not None and eot_token < config.vocab_size else None
    hf = {
        "architectures": [HF_CLASS[architecture]], "model_type": architecture,
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None if _mlp_hidden(config) == 4 * config.n_embd else _mlp_hidden(config),
        # PyTorch's tanh GELU kernel, which ours calls (gelu_new is the same formula, computed differently)
        "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }
    if architecture == "gpt2":
        hf.update(scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    else:
        hf.update(multi_query=True, attention_softmax_in_fp32=True, scale_attention_softmax_in_fp32=True)
    hf[META_KEY] = {**asdict(config), "encoding": encoding, "kv_heads_repeated": architecture == "gpt2"
                    and config.n_kv_groups != config.n_head}
    return hf


def repeat_kv_heads(w: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """c_attn rows (or bias) q | k | v with G KV heads -> q | k | v with n_head heads, each KV head repeated for
    its contiguous group of n_head // G query heads."""
    C, hd, G = config.n_embd, config.head_dim, config.n_kv_groups
    q, k, v = w.split([C, G * hd, G * hd], dim=0)
    rep = config.n_head // G
    k = k.reshape(G, hd, *w.shape[1:]).repeat_interleave(rep, dim=0).reshape(C, *w.shape[1:])  # (n_head * hd, ...)
    v = v.reshape(G, hd, *w.shape[1:]).repeat_interleave(rep, dim=0).reshape(C, *w.shape[1:])
    return torch.cat([q, k, v], dim=0)


@torch.no_grad()
def hf_state_dict(model: GPT, architecture: str) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names: GPT-2's Conv1D stores (in, out), so its matrices are transposed;
    GPTBigCode uses nn.Linear like ours. The vocabulary padding is dropped; lm_head is tied to wte (not stored)."""
    c = model.config
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    gpt2 = architecture == "gpt2"
    out = {"transformer.wte.weight": ours["transformer.wte.weight"][: c.vocab_size],
           "transformer.wpe.weight": ours["transformer.wpe.weight"]}

    def bias(name: str, size: int) -> torch.Tensor:
        return ours[name] if name in ours else torch.zeros(size)  # bias=False: zero biases, the same function

    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = ours[p + ln + ".weight"]
            out[p + ln + ".bias"] = bias(p + ln + ".bias", c.n_embd)
        qkv = ours[p + "attn.c_attn.weight"]  # (C + 2 * G * hd, C)
        qkv_bias = bias(p + "attn.c_attn.bias", qkv.size(0))
        if gpt2 and c.n_kv_groups != c.n_head:
            qkv, qkv_bias = repeat_kv_heads(qkv, c), repeat_kv_heads(qkv_bias, c)  # (3C, C), (3C,)
        linears = {"attn.c_attn": (qkv, qkv_bias),
                   "attn.c_proj": (ours[p + "attn.c_proj.weight"], bias(p + "attn.c_proj.bias", c.n_embd)),
                   "mlp.c_fc": (ours[p + "mlp.c_fc.weight"], bias(p + "mlp.c_fc.bias", _mlp_hidden(c))),
                   "mlp.c_proj": (ours[p + "mlp.c_proj.weight"], bias(p + "mlp.c_proj.bias", c.n_embd))}
        for name, (w, b) in linears.items():
            out[p + name + ".weight"] = w.t() if gpt2 else w
            out[p + name + ".bias"] = b
    out["transformer.ln_f.weight"] = ours["transformer.ln_f.weight"]
    out["transformer.ln_f.bias"] = bias("transformer.ln_f.bias", c.n_embd)
    return {k: v.contiguous().clone() for k, v in out.items()}  # safetensors refuses views and shared storage


def hf_files(model: GPT, encoding: str, eot_token: int | None, architecture: str = "auto") -> dict[str, bytes]:
    """config.json and model.safetensors, ready to write (the tokenizer files come from the caller)."""
    from safetensors.torch import save

    arch = resolve_architecture(model.config, architecture)
    config = hf_config(model.config, arch, eot_token, encoding)
    return {"config.json": (json.dumps(config, indent=2) + "\n").encode(),
            "model.safetensors": save(hf_state_dict(model, arch), metadata={"format": "pt"})}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over a file or a non-empty folder unless overwrite is set."""
    if not isinstance(overwrite, bool):  # the string "no" is truthy: it would delete the folder it should keep
        raise UserError(f"overwrite={overwrite!r} must be true or false")
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out={out} is not empty; pass overwrite=true to replace it, or another folder")


def write_folder(out: str | Path, files: dict[str, bytes], overwrite: bool = False) -> Path:
    """Write `files` as the folder `out`, all or nothing: into a temp folder beside it, then renamed into place.

    With `overwrite`, an existing folder is moved aside first and deleted once the new one is in place, so a
    crash leaves either the old folder or the new one (plus a hidden `.NAME.old-*`), never a half-written one.
    """
    out = Path(out).expanduser().resolve()
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if out.exists():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.replace(out, old)  # an empty target directory is replaced by the rename itself
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous export back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
