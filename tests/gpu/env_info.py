"""What the GPU check runs on, as JSON: python env_info.py OUT.json (also printed).

Which card (and its dense spec peaks from our table), its memory, torch/lightning/hydra versions and where hydra
was imported from (the wheels that travel in .whl/ must win), and whether the gpt2 tokenizer loads offline."""

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hydra  # noqa: E402
import lightning  # noqa: E402
import omegaconf  # noqa: E402

from gpt_lightning.measure.limits import card_of, spec_peak  # noqa: E402

cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
info = {
    "cuda": cuda,
    "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
    "card": card_of(torch.cuda.get_device_name(device)) if cuda else None,
    "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
    "bf16": torch.cuda.is_bf16_supported() if cuda else None,
    "spec_peak_bf16": spec_peak(device, torch.bfloat16),
    "spec_peak_fp32": spec_peak(device, torch.float32),
    "float32_matmul_precision": torch.get_float32_matmul_precision(),
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "cuda_runtime": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None,
    "lightning": lightning.__version__,
    "hydra": hydra.__version__,
    "hydra_from": str(Path(hydra.__file__).parent),
    "omegaconf": omegaconf.__version__,
    "cpu_threads": torch.get_num_threads(),
}
try:
    import tiktoken

    info["gpt2_tokenizer"] = tiktoken.get_encoding("gpt2").n_vocab
except Exception as e:  # offline without the carried cache
    info["gpt2_tokenizer"] = f"unavailable: {type(e).__name__}"
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
Path(sys.argv[1]).write_text(json.dumps(info, indent=1))
print(json.dumps(info, indent=1))
