"""Bits per byte: the tokenizer-independent quality axis (summed nats / (ln 2 x target UTF-8 bytes))."""

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpt_lightning.data.tokens import get_encoding, token_byte_lengths
from gpt_lightning.model import GPTConfig
from gpt_lightning.training.module import GPTLightningModule


def test_byte_table_of_the_bytes_encoding_is_one_per_byte_and_zero_for_endoftext():
    table = token_byte_lengths("bytes")
    assert table.shape == (257,) and (table[:256] == 1).all() and table[256] == 0


def test_byte_table_counts_utf8_bytes_of_each_gpt2_token(require_encoding):
    enc = require_encoding("gpt2")
    table = token_byte_lengths("gpt2")
    (the,) = enc.encode_ordinary(" the")
    (a_acute,) = enc.encode_ordinary("á")  # one token, two UTF-8 bytes
    assert (table[the], table[a_acute], table[enc.eot_token]) == (4, 2, 0)
    text = "Capitú, olhos de ressaca."
    assert table[enc.encode_ordinary(text)].sum() == len(text.encode("utf-8"))


def validate(module, x, y):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=3), verbose=False)[0]


def test_for_bytes_bpb_is_loss_over_ln2_up_to_the_endoftext_targets():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_kv_groups=1, n_embd=16)
    module = GPTLightningModule.from_config(config, {"lr": 1e-3}, encoding="bytes")
    x, y = torch.randint(0, 256, (6, 16)), torch.randint(0, 256, (6, 16))
    clean = validate(module, x, y)
    assert math.isclose(clean["val/bpb"], clean["val/loss"] / math.log(2), rel_tol=1e-6)
    y[:, ::4] = get_encoding("bytes").eot_token  # a quarter of the targets are <|endoftext|>: 0 bytes
    with_eot = validate(module, x, y)
    assert math.isclose(with_eot["val/bpb"], with_eot["val/loss"] / math.log(2) * 4 / 3, rel_tol=1e-5)
