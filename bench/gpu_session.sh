#!/usr/bin/env bash
# The GPU measurements of the training step and of the data pipeline, in one call of a lent GPU
# (see bench/README.md; every figure lands in $OUT, then in bench/results/ with the GPU's name).
# Before the call, in the project root: bash ../shared/gpu/prepare-wheels.sh (pydantic for Python 3.12).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/glsd-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)"
step() { echo "== $*"; }
step step bound
timeout 110 python3 bench/step_bound.py --device cuda --presets ${STEP_PRESETS:-vits16-dino,vits16-geo,swint-geo} \
  --batch 128 --precisions bf16 --steps 8 --warmup 3 --out "$OUT/step_bound-cuda.json" | tail -12
step end to end
timeout 270 python3 bench/end_to_end.py --device cuda --batch 128 --workers 14 --images 8192 --log-every 4 \
  --skip-steps 40 --loader-batches 12 --precision bf16 --out "$OUT/end_to_end-cuda.json" \
  --arms vits16-dino:workers,vits16-dino:device,vits16-geo:device,vits16-geo:workers | grep -v "^wrote"
if [ "${COMPILE_S:-0}" -gt 0 ]; then
  step compile
  timeout "$COMPILE_S" python3 bench/step_bound.py --device cuda --presets vits16-geo --batch 128 --precisions bf16 \
    --compile --steps 8 --warmup 3 --out "$OUT/step_bound-cuda-compile.json" | tail -8
fi
echo done
