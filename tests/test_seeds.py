"""`seed` as a sweep axis: it changes the weight initialisation and the data order, never the data split."""

from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gpt_lightning.training.model_config import gpt_config_from_cfg
from gpt_lightning.training.module import GPTLightningModule

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def run_objects(fixture_corpus, root: Path, seed: int):
    """What train builds for `seed=<seed>` (the real config, shrunk): the prepared datamodule and the module."""
    base_url, ids = fixture_corpus
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("config", overrides=[
            f"seed={seed}", "data.split=random_paragraphs",  # the split that has a seed of its own to keep
            f"data.base_url={base_url}", f"data.books=[{','.join(map(str, ids))}]", f"data.root={root}",
            "data.encoding=bytes", "data.pause=0", "data.batch_size=4", "model.block_size=32", "model.n_layer=1",
            "model.n_embd=32", "model.n_heads=4"])
    L.seed_everything(cfg.seed)
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    module = GPTLightningModule.from_config(gpt_config_from_cfg(cfg, dm.vocab_size),
                                            OmegaConf.to_container(cfg.optim, resolve=True))
    return cfg, dm, module


def test_two_seeds_share_the_split_and_differ_in_weights_and_data_order(fixture_corpus, tmp_path):
    cfg1, dm1, m1 = run_objects(fixture_corpus, tmp_path / "data", 1)
    cfg2, dm2, m2 = run_objects(fixture_corpus, tmp_path / "data", 2)
    assert (cfg1.data.seed, cfg2.data.seed) == (1, 2) and cfg1.data.split_seed == cfg2.data.split_seed
    assert dm1.token_dir == dm2.token_dir  # one token cache: the seed is not part of its key
    for split in ("val", "test"):
        assert (dm1.token_dir / f"{split}.bin").read_bytes() == (dm2.token_dir / f"{split}.bin").read_bytes()
    assert not torch.equal(next(iter(dm1.train_dataloader()))[0], next(iter(dm2.train_dataloader()))[0])
    w1, w2 = (m.model.transformer.h[0].attn.c_attn.weight for m in (m1, m2))
    assert not torch.equal(w1, w2)
    _, _, again = run_objects(fixture_corpus, tmp_path / "data", 1)
    assert torch.equal(again.model.transformer.h[0].attn.c_attn.weight, w1)  # the seed alone decides the weights
