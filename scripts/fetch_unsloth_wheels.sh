#!/usr/bin/env bash
# Run from the project's root. Downloads the wheels `scripts/bench.py --paths unsloth` needs on the GPU machine into
# .whl-unsloth/ (git-ignored), for Python 3.12 / x86-64. They do not fit one device call together with .whl/
# (bitsandbytes alone is 43 MB; 64 MiB per call in all), so they travel in a call of their own and install into their
# own --target folder: see scripts/device_prelude_unsloth.sh.
# unsloth + unsloth-zoo 2026.10.9 pin trl <= 1.15 and datasets < 5: those two are here in the versions unsloth takes,
# and reach only the unsloth process (its folder goes first on its PYTHONPATH). torch, transformers, peft,
# accelerate, bitsandbytes come from the main set; xformers is optional for unsloth and left out.
set -euo pipefail
mkdir -p .whl-unsloth  # .gitignore lists it
# unsloth's own pins, and its unpinned dependencies pinned to what PyPI served on 2026-11-30
PKGS=${PKGS:-"unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 tyro==1.0.17 docstring-parser==0.18.0
typeguard==4.6.1 shtab==1.13.0 msgspec==0.23.0 cut-cross-entropy==25.1.1 torchao==0.18.0 hf-transfer==0.1.9
structlog==26.1.0 json5==0.17.3 nest-asyncio==1.6.0 xxhash==4.1.0 diffusers==0.42.1"}
for p in $PKGS ${EXTRA_PKGS:-}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl-unsloth "$p"
done
du -sh .whl-unsloth; ls .whl-unsloth
