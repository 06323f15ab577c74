"""The LightningModule's optimizer setup and schedule."""

import pytest
import torch

from gpt_lightning.model import GPTConfig
from gpt_lightning.model.optim import cosine_with_warmup
from gpt_lightning.training.module import GPTLightningModule


def test_schedule_warms_up_then_decays_to_min():
    f = lambda s: cosine_with_warmup(s, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_checkpoint_hyperparameters_rebuild_the_model():
    cfg = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=4, n_kv_groups=1, n_embd=32)
    m = GPTLightningModule.from_config(cfg, {"lr": 1e-3}, encoding="bytes")
    rebuilt = GPTLightningModule(**m.hparams)
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randint(0, 257, (1, 8))
    torch.testing.assert_close(rebuilt.model(x), m.model(x))
    assert rebuilt.hparams.encoding == "bytes" and rebuilt.config.n_kv_groups == 1


def test_compile_keeps_checkpoint_keys():
    cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_kv_groups=1, n_embd=16)
    plain = GPTLightningModule.from_config(cfg, {"lr": 1e-3})
    compiled = GPTLightningModule.from_config(cfg, {"lr": 1e-3}, compile=True)
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
