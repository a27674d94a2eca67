#!/usr/bin/env bash
# noodle's CUDA checks in one run (a few minutes on a bare CUDA machine): see bench/gpu_check.py.
#
#   bash bench/gpu_wheels.sh        # here, once: the wheels a CUDA image may lack, into .whl/ (git-ignored)
#   bash bench/gpu_check.sh         # there: installs .whl/*.whl into /tmp/site when pydantic/fastapi are missing or transformers < 5.25
#   bash bench/gpu_check.sh --cpu   # anywhere: the same checks with the "gpu" stages on the CPU
#
# Results: one PASS/FAIL/INFO line per check on stdout, and $OUT/gpu_check.json (out/gpu_check/ without $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && ! "$PY" -c 'import torch' 2>/dev/null; then PY=.venv/bin/python; fi
# the carried wheels go first on the path when noodle's needs are missing or the image's transformers is older
# than noodle's floor (5.25: packed steps give other tokens on 5.17-5.23)
if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c "import pydantic, fastapi, uvicorn, transformers as t, sys
sys.exit(tuple(int(x) for x in t.__version__.split('.')[:2]) < (5, 25))" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: could not install the carried wheels"; exit 3; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout 540 "$PY" bench/gpu_check.py "$@"
