"""`python -m gpt_lightning.generate ckpt_path=PATH prompt="..."`: stream a continuation to stdout as it is made."""

from __future__ import annotations

import codecs
import re
import sys

import hydra
import torch
from omegaconf import DictConfig

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.common.device import keep_freed_memory, pick_device
from gpt_lightning.common.errors import UserError
from gpt_lightning.data.tokens import encode_prompt, get_encoding
from gpt_lightning.model.sampling import check_sampling, stream_tokens
from gpt_lightning.training.checkpoints import load_gpt
from gpt_lightning.training.config_errors import one_line_config_errors
from gpt_lightning.training.schema import check_known_keys


def generate(cfg: DictConfig, out=sys.stdout) -> list[int]:
    """Write the prompt, then each new token's text as soon as it is complete UTF-8; return the new ids."""
    check_known_keys(cfg)
    if not cfg.ckpt_path:
        raise UserError("ckpt_path is required: python -m gpt_lightning.generate ckpt_path=PATH prompt=\"...\"")
    if cfg.max_new_tokens < 0:
        raise UserError(f"max_new_tokens={cfg.max_new_tokens} must be >= 0")
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    device = pick_device(cfg.device)
    model, hparams = load_gpt(cfg.ckpt_path, map_location=device)
    tokenizer = get_encoding(hparams.get("encoding", "gpt2"))
    ids = encode_prompt(tokenizer, cfg.prompt)
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"warning: the prompt has {len(ids)} tokens, more than the context of {block_size}; "
              f"the model sees only its last {block_size}", file=sys.stderr)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed) if cfg.seed is not None else generator.seed()
    idx = torch.tensor([ids], dtype=torch.long, device=device)

    out.write(cfg.prompt)
    out.flush()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span several tokens
    new = []
    for token in stream_tokens(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                               cuda_graph=cfg.cuda_graph):
        new.append(int(token[0]))
        out.write(utf8.decode(tokenizer.decode_single_token_bytes(new[-1])))
        out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")
    return new


def quote_prompt_override(args: list[str]) -> list[str]:
    """`prompt=Capítulo I, ${x}` as the shell passes it would break Hydra's override grammar (spaces, commas,
    quotes, interpolations): quote the value unless the user already did. Inside Hydra's quotes a backslash is
    special only before a quote, so only quotes, backslashes before them and `${` are escaped."""
    fixed = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key in ("prompt", "+prompt") and sep and not (len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
            value = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)  # backslashes before a quote double
            value = re.sub(r"(\\+)$", lambda m: m[1] * 2, value)  # ... and before the closing quote
            value = "'" + value.replace("${", "\\${") + "'"
        fixed.append(f"{key}{sep}{value}")
    return fixed


@one_line_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def _main(cfg: DictConfig) -> None:
    keep_freed_memory()
    with exits_on_user_error():
        generate(cfg)


def main() -> None:
    sys.argv[1:] = quote_prompt_override(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
