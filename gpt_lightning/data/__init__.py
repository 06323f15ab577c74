"""The data pipeline: fetch.py (HTTP + raw cache), clean.py (Gutenberg text -> paragraphs),
tokens.py (encodings, splits, token cache), windows.py (Dataset), datamodule.py (Lightning wiring)."""

from gpt_lightning.data.datamodule import MachadoDataModule

__all__ = ["MachadoDataModule"]
