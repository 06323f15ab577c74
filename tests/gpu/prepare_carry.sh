#!/usr/bin/env bash
# Make the two git-ignored folders the GPU check needs on a machine with no network (run here, where pip works):
#   .whl/         hydra-core, omegaconf, antlr4-python3-runtime: the packages our code imports that the GPU image
#                 lacks (it has torch, lightning, tiktoken, tensorboard, transformers, matplotlib, numpy, requests,
#                 urllib3, tqdm, safetensors, pyyaml, packaging, pytest, pytest-timeout). All three are pure
#                 python; antlr4-python3-runtime 4.9.3 (the 4.9.* that omegaconf 2.3 pins) is an sdist on PyPI,
#                 so pip builds its wheel here.
#   .gpu_corpus/  raw/<ID>.txt: the 12 books (books in raw/ are never fetched), and tiktoken_cache/: the two gpt2
#                 files, so data.encoding=gpt2 works offline.
# Usage: bash tests/gpu/prepare_carry.sh [BOOKS_DIR] [TIKTOKEN_CACHE_DIR]
#   defaults: ../shared/gutenberg (or /work/corpus_cache/raw) and ../shared/tiktoken_cache.
# Then: device run with carry [".whl", ".gpu_corpus"] (tests/gpu/run_on_device.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
BOOKS=${1:-}
if [[ -z $BOOKS ]]; then
  for d in ../shared/gutenberg /work/corpus_cache/raw; do [[ -d $d ]] && BOOKS=$d && break; done
fi
CACHE=${2:-${TIKTOKEN_CACHE_DIR:-../shared/tiktoken_cache}}

rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d .whl hydra-core==1.3.8 omegaconf==2.3.1
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

mkdir -p .gpu_corpus/raw .gpu_corpus/tiktoken_cache
IDS=$(python3 -c "import yaml; print(' '.join(str(b) for b in yaml.safe_load(open('conf/data/machado.yaml'))['books']))")
for id in $IDS; do cp "$BOOKS/$id.txt" .gpu_corpus/raw/; done
# tiktoken names cache files by the sha1 of the download URL: gpt2's vocab.bpe and encoder.json.
for f in 6d1cbeee0f20b3d9449abfede4726ed8212e3aee 6c7ea1a7e38e3a7f062df639a5b80947f075ffe6; do
  cp "$CACHE/$f" .gpu_corpus/tiktoken_cache/
done
TIKTOKEN_CACHE_DIR=$PWD/.gpu_corpus/tiktoken_cache python3 -c "import tiktoken; tiktoken.get_encoding('gpt2')"
ls -l .whl .gpu_corpus/raw .gpu_corpus/tiktoken_cache
du -sh .whl .gpu_corpus
