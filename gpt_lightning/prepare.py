"""Fetch, clean, split and tokenise the corpus: `python -m gpt_lightning.prepare [overrides]`.

Composes the same config as training, so the token cache it builds is the one training reads.
"""

import hydra
from omegaconf import DictConfig

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.training import model_config  # noqa: F401  (registers the config resolvers)
from gpt_lightning.training.config_errors import one_line_config_errors


def format_summary(meta: dict, root, token_dir) -> str:
    """One row per book, totals per split, and where the files are."""
    rows = [f"{'ID':>6}  {'title':<34} {'raw bytes':>10} {'clean chars':>11} {'paragraphs':>10} {'tokens':>10}"]
    for b in meta["books"]:
        rows.append(f"{b['id']:>6}  {b['title'][:34]:<34} {b['raw_bytes']:>10,} {b['clean_chars']:>11,} "
                    f"{b['paragraphs']:>10,} {sum(b['tokens'].values()):>10,}")
    total = lambda k: sum(b[k] for b in meta["books"])  # noqa: E731
    rows.append(f"{'total':>6}  {len(meta['books']):<34} {total('raw_bytes'):>10,} {total('clean_chars'):>11,} "
                f"{total('paragraphs'):>10,} {sum(meta['tokens'].values()):>10,}")
    t = meta["tokens"]
    rows += ["",
             f"tokens per split: train {t['train']:,} | val {t['val']:,} | test {t['test']:,}  "
             f"(encoding {meta['encoding']}, n_vocab {meta['n_vocab']}, {meta['dtype']})",
             f"raw/    {root / 'raw'}", f"clean/  {root / 'clean'}", f"tokens/ {token_dir}"]
    return "\n".join(rows)


@one_line_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    with exits_on_user_error():
        dm = hydra.utils.instantiate(cfg.data)
        dm.prepare_data()
        dm.setup()  # checks every split holds at least one window of block_size
        print(format_summary(dm.meta, dm.root, dm.token_dir))


if __name__ == "__main__":
    main()
