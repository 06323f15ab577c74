"""What a run reports, in one typed, versioned record: `train` writes it as `<run>/summary.json`, `evaluate` as
`<checkpoint stem>.eval.json`, `bench` as `bench.json`; `compare`, the GPU check script and the tests read it back
with `RunRecord.load`. No other code spells its keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from gpt_lightning.common.errors import UserError
from gpt_lightning.common.files import atomic_write_json
from gpt_lightning.model import GPT, attention_label, kv_cache_bytes_per_token

RECORD_VERSION = 1
TRAIN_RECORD = "summary.json"  # inside the run directory


class RecordError(UserError):
    """A record that cannot be read (missing, not JSON, not an object, wrong types): the message says which file."""


@dataclass
class RunRecord:
    kind: str                                   # "train", "evaluate" or "bench"
    status: str = "complete"                    # "complete" or "failed"
    error: str | None = None                    # why it failed
    # shape
    attention: str | None = None                # mha | gqa | mqa, derived from n_head and kv_groups
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    kv_groups: int | None = None
    mlp_hidden: int | None = None               # MLP width (4 * n_embd unless widened to match parameters)
    block_size: int | None = None
    vocab_size: int | None = None
    encoding: str | None = None
    parameters: int | None = None
    kv_cache_bytes_per_token: int | None = None       # fp32; half in bf16
    kv_cache_bytes_per_token_mha: int | None = None   # MHA's at the same shape
    # progress
    global_step: int | None = None
    tokens_seen: int | None = None
    # quality (nats per token; bits per UTF-8 byte)
    best_val_loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    val_bpb: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    test_bpb: float | None = None
    # speed and memory, measured on `device`
    train_tokens_per_sec: float | None = None
    train_mfu: float | None = None
    decode_tokens_per_sec: float | None = None        # batch 1, KV cache, greedy
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    precision: str | None = None
    device: str | None = None
    checkpoint: str | None = None
    details: dict = field(default_factory=dict)       # what only one kind reports (bench tables, decode grid, ...)
    version: int = RECORD_VERSION

    @classmethod
    def for_model(cls, kind: str, model: GPT, **values) -> "RunRecord":
        """A record with the shape, size and KV-cache figures of `model` filled in."""
        c = model.config
        return cls(kind=kind, attention=c.attention, n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head,
                   kv_groups=c.n_kv_groups, mlp_hidden=getattr(c, "mlp_hidden", None) or 4 * c.n_embd,
                   block_size=c.block_size, vocab_size=c.vocab_size, parameters=model.num_params(non_embedding=False),
                   kv_cache_bytes_per_token=kv_cache_bytes_per_token(c.n_layer, c.n_kv_groups, c.head_dim),
                   kv_cache_bytes_per_token_mha=kv_cache_bytes_per_token(c.n_layer, c.n_head, c.head_dim),
                   **values)

    def to_dict(self) -> dict:
        return {k: _finite(v) for k, v in asdict(self).items()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        """Read a record; records from before the version field (summary.json of the first round) are upgraded."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecordError(f"{path}: no such record") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RecordError(f"{path}: not a readable JSON record ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{path}: a record is a JSON object, found {type(data).__name__}")
        if not data:  # version 0 had no `kind`, so `{}` would pass as an empty "complete" run
            raise RecordError(f"{path}: an empty JSON object, not a run record")
        data = _upgrade(data)
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "kind" not in values:
            raise RecordError(f"{path}: no 'kind' field; not a gpt_lightning run record")
        for name in ("n_head", "kv_groups", "n_layer", "n_embd", "parameters", "global_step"):
            v = values.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise RecordError(f"{path}: {name}={v!r} is not a non-negative integer")
        if values.get("n_head") and values.get("kv_groups"):
            values["attention"] = attention_label(values["n_head"], values["kv_groups"])
        return cls(**values)


def _upgrade(data: dict) -> dict:
    """Version 0 (no version field): `attention_type`, per-batch decode keys, status implied."""
    if "version" in data:
        return data
    data = dict(data)
    data.setdefault("kind", "evaluate" if "checkpoint" in data else "train")
    data.pop("attention_type", None)
    if data.get("decode_tokens_per_sec") is None and "decode_tokens_per_sec_b1" in data:
        data["decode_tokens_per_sec"] = data["decode_tokens_per_sec_b1"]
    data["version"] = 0
    return data


def _finite(v):
    """NaN and inf are not JSON: they become null (an empty cell, never 0)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
