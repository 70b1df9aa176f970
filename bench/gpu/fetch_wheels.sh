#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the wheels a GPU machine without a registry lacks for the GPU tests
# and benchmarks (its image has torch, triton, numpy, safetensors, tokenizers, huggingface_hub, xxhash,
# pytest and hypothesis): CPython 3.12, x86-64, into .whl/ (git-ignored). Versions are pyproject.toml's.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  grpcio==1.85.1 grpcio-health-checking==1.85.1 protobuf==7.36.2 transformers==5.23.0 \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  opentelemetry-sdk==1.45.2 opentelemetry-api==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  pytest-timeout==2.4.0
du -sh .whl
