"""Weights from elsewhere into our GPT: MHA -> GQA/MQA by pooling KV heads, and Hugging Face GPT-2 checkpoints.

Uptraining (arXiv 2305.13245, section 2.1): the key and value projection heads of each contiguous group are
replaced by their mean (or the group's first head, or a fresh initialisation: section 3.3's comparison); every
other weight is copied. Query head i then reads pooled KV head i // (n_head // G),
the same contiguous grouping SDPA's `enable_gqa` uses. A group of identical heads (a GQA model exported to GPT-2
repeats each KV head) mean-pools to that head bit for bit.

Hugging Face folders (`load_hf_gpt2`): OpenAI's GPT-2 or any `save_pretrained` GPT-2, and our own exports
(`gpt_lightning/model/export.py`: GPT-2, or GPTBigCode with multi_query), which come back as the model they were
made from.
"""

from __future__ import annotations

import json
import warnings
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
    like = next(model.parameters())  # the new model lives where the source does, in its dtype (bf16 stays bf16)
    new = GPT(replace(src, n_kv_groups=kv_groups)).to(device=like.device, dtype=like.dtype)
    fresh = new.state_dict()  # random: the K/V rows come from here (the global torch RNG, seeded by the run)
    C, hd = src.n_embd, src.head_dim
    per_group = src.n_kv_groups // kv_groups

    def group(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(kv_groups, per_group, hd, *t.shape[1:])  # (G, heads per group, hd, ...)
        if method == "first" or torch.equal(t, t[:, :1].expand_as(t)):  # repeated heads: exact, no rounding
            return t[:, 0].flatten(0, 1)
        return t.float().mean(dim=1).to(t.dtype).flatten(0, 1)  # (G * hd, ...); fp32 sum, one rounding

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


META_KEY = "gpt_lightning"  # our shape inside an export's config.json (see gpt_lightning/model/export.py)


def read_hf_config(path: str | Path) -> dict:
    """config.json of a Hugging Face folder, or one clear error."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"init_from=hf:{path}: no config.json there; pass a Hugging Face GPT-2 folder")
    try:
        hf = json.loads((path / "config.json").read_text())
        for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
            int(hf[k])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path / 'config.json'} is not a GPT-2 config ({type(e).__name__}: {e}); "
                        f"pass a folder written by GPT2LMHeadModel.save_pretrained") from None
    return hf


def hf_encoding(path: str | Path) -> str:
    """The tokenizer a Hugging Face folder's ids belong to: what our export recorded, else GPT-2's."""
    return read_hf_config(path).get(META_KEY, {}).get("encoding", "gpt2")


@torch.no_grad()
def load_hf_gpt2(path: str | Path, kv_groups: int | None = None) -> GPT:
    """Our GPT from a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin).

    A GPT-2 folder loads as MHA, exactly (an `n_inner` MLP width included). Our own exports load as the model they
    were made from: the KV-head count, `bias` and encoding recorded in config.json["gpt_lightning"]; a GQA model's
    repeated KV heads collapse back bit for bit, but only while they are still equal: a GQA export trained further
    in transformers (save_pretrained keeps our key) loads as MHA, with a RuntimeWarning. GPTBigCode (multi_query)
    is MQA. With `kv_groups`, the KV heads are then mean-pooled to that many. A config.json key that changes the
    function (scale_attn_weights=false, scale_attn_by_inverse_layer_idx=true, layer_norm_epsilon other than 1e-5,
    another activation) is refused. `transformers` is not needed: the files are read with safetensors / torch.
    """
    path = Path(path).expanduser()
    hf = read_hf_config(path)
    shape = {k: int(hf[k]) for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")}
    model_type = hf.get("model_type", "gpt2")
    if model_type not in ("gpt2", "gpt_bigcode"):
        raise UserError(f"{path}: model_type={model_type!r}; only gpt2 and gpt_bigcode (multi_query) are supported")
    if model_type == "gpt_bigcode" and not hf.get("multi_query", True):
        raise UserError(f"{path}: gpt_bigcode with multi_query=false interleaves q, k, v per head; "
                        f"only multi_query=true (MQA) is supported")
    check_hf_function(path, hf)
    n_inner = hf.get("n_inner")  # the MLP width; null is GPT-2's 4 * n_embd
    mlp_hidden = int(n_inner) if n_inner is not None and int(n_inner) != 4 * shape["n_embd"] else None
    meta = hf.get(META_KEY, {})
    hf_state = {k.removeprefix("transformer."): v for k, v in _read_hf_state(path).items()}
    # A bias=False export carries zero biases; a folder whose biases are not all zero keeps them.
    bias = meta.get("bias", True) or any(t.any() for k, t in hf_state.items() if k.endswith(".bias"))
    bigcode = model_type == "gpt_bigcode"
    config = GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["n_positions"], n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_kv_groups=1 if bigcode else shape["n_head"],
                       n_embd=shape["n_embd"], dropout=float(meta.get("dropout", 0.0)), bias=bias,
                       mlp_hidden=mlp_hidden)
    model = GPT(config)
    ours = model.state_dict()
    for name in ours:
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        key = name.removeprefix("transformer.")
        if key not in hf_state:
            raise UserError(f"{path}: tensor {key!r} missing; is this a GPT-2 checkpoint?")
        t = hf_state[key]
        if not bigcode and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()  # HF GPT-2 stores Conv1D weights as (in, out); nn.Linear (and GPTBigCode) want (out, in)
        if key == "wte.weight":  # pad the vocabulary rows to a multiple of 64
            t = torch.cat([t, t.new_zeros(ours[name].size(0) - t.size(0), t.size(1))])
        if t.shape != ours[name].shape:
            raise UserError(f"{path}: {key} has shape {tuple(t.shape)}, expected {tuple(ours[name].shape)}")
        ours[name].copy_(t)
    recorded = int(meta.get("n_kv_groups") or config.n_kv_groups)  # our GQA export to GPT-2: its own KV heads
    if not bigcode and recorded != config.n_kv_groups:
        if recorded < 1 or config.n_head % recorded:
            raise UserError(f"{path}: config.json's gpt_lightning.n_kv_groups={recorded} does not divide "
                            f"n_head={config.n_head}; remove that key to load the folder as GPT-2 (MHA)")
        if kv_heads_repeated(model, recorded):  # as our export wrote them: collapse back bit for bit
            if kv_groups is None or recorded % kv_groups == 0:
                model = pool_kv_heads(model, recorded)
        elif kv_groups is None:  # changed since (fine-tuned in transformers): averaging would change the model
            warnings.warn(f"{path}: config.json records {recorded} KV heads (gpt_lightning.n_kv_groups), but its "
                          f"{config.n_head} repeated KV heads are no longer equal in groups (trained after the "
                          f"export?); loading it as MHA with {config.n_head} KV heads, not averaged back to "
                          f"{recorded}. Pooling to fewer (kv_groups=, or attention.kv_groups with init_from) "
                          f"averages them", RuntimeWarning, stacklevel=2)
    if kv_groups is not None and kv_groups != model.config.n_kv_groups:
        model = pool_kv_heads(model, kv_groups)
    return model


def kv_heads_repeated(model: GPT, kv_groups: int) -> bool:
    """Whether every layer's K and V heads (weights and biases) are equal, bit for bit, within each contiguous
    group of n_head // kv_groups heads: what exporting a `kv_groups` model to GPT-2 writes."""
    c = model.config
    C, hd, per_group = c.n_embd, c.head_dim, c.n_kv_groups // kv_groups
    for name, t in model.state_dict().items():
        if ".attn.c_attn." not in name:
            continue
        for part in t.split([C, c.n_kv_groups * hd, c.n_kv_groups * hd], dim=0)[1:]:  # k, v
            heads = part.reshape(kv_groups, per_group, hd, *t.shape[1:])  # (G, heads per group, hd, ...)
            if not torch.equal(heads, heads[:, :1].expand_as(heads)):
                return False
    return True


def check_hf_function(path: Path, hf: dict) -> None:
    """Refuse, in one line, a config.json key that makes the folder compute another function than our GPT:
    ours is GPT-2's pre-LayerNorm block with GELU(tanh), LayerNorm eps 1e-5 and scores scaled by 1 / sqrt(hd)."""
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: activation_function={hf['activation_function']!r}; ours is GELU(tanh)")
    if not hf.get("scale_attn_weights", True):
        raise UserError(f"{path}: scale_attn_weights=false (attention scores not divided by sqrt(head_dim)); "
                        f"ours always scales them, so this model cannot be loaded")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"{path}: scale_attn_by_inverse_layer_idx=true (layer i's scores divided by i + 1); ours "
                        f"does not scale by layer, so this model cannot be loaded")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if eps is None or float(eps) != 1e-5:
        raise UserError(f"{path}: layer_norm_epsilon={eps}; ours is PyTorch's LayerNorm default 1e-5, so this model "
                        f"cannot be loaded exactly")
    # reorder_and_upcast_attn=true is allowed: it only computes the scores and softmax in fp32 (GPT-2's fix for
    # fp16 overflow); the function is the same, and our fp32 weights compute it in fp32 anyway (SDPA's softmax
    # accumulates in fp32 under autocast too). Likewise GPTBigCode's attention_softmax_in_fp32 flags.
