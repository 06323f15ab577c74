"""`python -m gpt_lightning.export ckpt_path=PATH out=DIR [overwrite=true]`: a checkpoint as a Hugging Face folder.

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)` (and, for the gpt2 encoding,
`AutoTokenizer.from_pretrained(DIR)`); `init_from=hf:DIR` loads it back here exactly. The conversion is in
`gpt_lightning/model/export.py` (pure torch + safetensors); `transformers` is not needed to export.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.common.errors import UserError
from gpt_lightning.data.hf_tokenizer import gpt2_tokenizer_files
from gpt_lightning.data.tokens import get_encoding
from gpt_lightning.model.export import (HF_CLASS, check_architecture, check_out_dir, hf_files, resolve_architecture,
                                        write_folder)
from gpt_lightning.training.checkpoints import load_gpt
from gpt_lightning.training.config_errors import one_line_config_errors
from gpt_lightning.training.schema import check_known_keys


def folder_readme(ckpt_path: str, config, arch: str, encoding: str) -> str:
    kv = (f"each of its {config.n_kv_groups} KV heads repeated for its {config.n_head // config.n_kv_groups} query "
          f"heads (exact)" if arch == "gpt2" and config.n_kv_groups != config.n_head else "weights as trained")
    lines = [f"# Exported from {ckpt_path}", "",
             f"- {config.attention}: {config.n_layer} layers x {config.n_embd}, {config.n_head} heads, "
             f"{config.n_kv_groups} KV heads, context {config.block_size}",
             f"- `{HF_CLASS[arch]}`: {kv}", f"- tokenizer: `{encoding}`", ""]
    if encoding == "gpt2":
        lines.append("The GPT-2 tokenizer files are included: `AutoTokenizer.from_pretrained(this folder)`.")
    else:
        lines.append(f"No tokenizer is included: `{encoding}` has no Hugging Face GPT-2 tokenizer files. "
                     f"Supply the tokenizer yourself (token ids are those of `{encoding}`"
                     + (": 256 byte values, then <|endoftext|> = 256)." if encoding == "bytes" else ")."))
    return "\n".join(lines) + "\n"


def export(cfg: DictConfig) -> Path:
    check_known_keys(cfg)  # `+typo=1` composes past the schema (conf/export.yaml names export_schema)
    if not cfg.ckpt_path or not cfg.out:
        raise UserError("ckpt_path and out are required: python -m gpt_lightning.export ckpt_path=PATH out=DIR")
    out = Path(str(cfg.out)).expanduser().resolve()
    check_architecture(cfg.architecture)  # before loading anything
    check_out_dir(out, cfg.overwrite)
    model, hparams = load_gpt(cfg.ckpt_path)
    encoding = hparams.get("encoding", "gpt2")
    arch = resolve_architecture(model.config, cfg.architecture)
    try:
        eot = get_encoding(encoding).eot_token
    except UserError:  # an encoding not in the local tiktoken cache: the weights export all the same
        eot = None
    files = hf_files(model, encoding, eot, arch)
    if encoding == "gpt2":
        files.update(gpt2_tokenizer_files(model.config.block_size))
    else:
        print(f"note: data.encoding={encoding} has no Hugging Face tokenizer files; {out} holds the weights only, "
              f"supply the tokenizer yourself (see its README.md)", file=sys.stderr)
    files["README.md"] = folder_readme(str(cfg.ckpt_path), model.config, arch, encoding).encode()
    out = write_folder(out, files, overwrite=cfg.overwrite)
    print(f"exported {cfg.ckpt_path} ({model.config.attention}, {model.config.n_head} heads, "
          f"{model.config.n_kv_groups} KV heads) as {HF_CLASS[arch]} to {out}: {', '.join(sorted(files))}")
    return out


@one_line_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with exits_on_user_error():
        export(cfg)


if __name__ == "__main__":
    main()
