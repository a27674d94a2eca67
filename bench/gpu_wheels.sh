#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on a CUDA image that has torch but not noodle's other needs, or an
# older transformers than noodle's floor (the image has shipped 5.17; noodle needs the constraints.txt pin):
# Python 3.12, x86-64 manylinux, into .whl/ (ignored by git; carried to the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=()
for n in 2_28 2_27 2_17 2_5; do plat+=(--platform "manylinux_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  'pydantic>=2.5,<3' 'pydantic-core' 'annotated-types' 'typing-inspection' 'fastapi>=0.115' 'starlette' \
  'uvicorn>=0.30' 'grpcio>=1.81.1' 'protobuf>=6.33.5,<7' \
  $(grep -iE '^(transformers|tokenizers|huggingface_hub|safetensors|hf-xet)==' constraints.txt)
ls -la .whl
