"""Hugging Face tokenizer files for an export: GPT-2's `vocab.json` + `merges.txt`, which `GPT2TokenizerFast` loads.

tiktoken's `gpt2` encoding is built from OpenAI's original `encoder.json` and `vocab.bpe`: they are exactly
GPT-2's `vocab.json` and `merges.txt`. They are read through tiktoken's cache (`TIKTOKEN_CACHE_DIR`), so an
offline machine that trained with gpt2 can export its tokenizer too. Other encodings have no GPT-2 tokenizer
files: the export then carries the weights and a note (see `gpt_lightning/export.py`).
"""

from __future__ import annotations

import json

from gpt_lightning.common.errors import UserError

# The URLs (and sha256 hashes) tiktoken's gpt2 encoding is built from; the cache is keyed by the URL.
GPT2_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
EOT = "<|endoftext|>"


def gpt2_tokenizer_files(model_max_length: int) -> dict[str, bytes]:
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json of GPT-2."""
    from tiktoken.load import read_file_cached

    files = {}
    for name, (url, sha256) in GPT2_FILES.items():
        try:
            files[name] = read_file_cached(url, sha256)
        except Exception as e:  # offline and not cached
            raise UserError(f"cannot read GPT-2's {url.rsplit('/', 1)[-1]} ({type(e).__name__}); set "
                            f"TIKTOKEN_CACHE_DIR to the tiktoken cache that holds the gpt2 encoding") from None
    vocab = json.loads(files["vocab.json"])
    if vocab.get(EOT) != 50256:
        raise UserError(f"the cached GPT-2 encoder.json has {EOT}={vocab.get(EOT)}, not 50256; clear the tiktoken cache")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {**special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, "add_bos_token": False, "errors": "replace"}
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    files["tokenizer.json"] = json.dumps(tokenizer_json(vocab, files["merges.txt"].decode())).encode()
    files["special_tokens_map.json"] = (json.dumps(special, indent=2) + "\n").encode()
    return files


def tokenizer_json(vocab: dict[str, int], merges: str) -> dict:
    """GPT-2's tokenizer in the `tokenizers` serialization (tokenizer.json), built from vocab.json and merges.txt.

    `AutoTokenizer` needs it for model types whose registered tokenizer is the generic `tokenizers` backend
    (gpt_bigcode, our MQA export); GPT-2's own class reads vocab.json + merges.txt either way.
    """
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": vocab[EOT], "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": [line for line in merges.splitlines()[1:] if line.strip()]},  # after "#version: 0.2"
    }
