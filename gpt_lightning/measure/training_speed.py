"""Training tokens/s of one contender (model + optimizer + precision) over a fixed batch, for the bench."""

from __future__ import annotations

import time

import torch

from gpt_lightning.measure.timing import sync


class TrainContender:
    """One model + optimizer + precision; `run(steps)` returns tokens/s over those steps."""

    def __init__(self, name, model, optimizer, x, y, autocast_dtype=None, hf=False, clip=None):
        self.name, self.model, self.opt, self.x, self.y = name, model.train(), optimizer, x, y
        self.autocast_dtype, self.hf, self.clip = autocast_dtype, hf, clip
        self.device = x.device

    def step(self):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.model(self.x, labels=self.x).loss if self.hf else self.model(self.x, self.y)
        loss.backward()
        if self.clip:  # our training setup clips, as trainer.gradient_clip_val does
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def run(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.x.numel() / (time.perf_counter() - start)
