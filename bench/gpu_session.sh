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
step target gather
timeout 60 python3 bench/target_gather.py --device cuda --batch 128 --out "$OUT/target_gather-cuda.json" | tail -7
step step bound
timeout 200 python3 bench/step_bound.py --device cuda --presets vits16-dino,vits16-geo,swint-geo --batch 128 \
  --precisions bf16 --steps 8 --warmup 3 --out "$OUT/step_bound-cuda.json" | tail -12
step step bound, dense out_dim 65536
timeout 90 python3 bench/step_bound.py --device cuda --presets vits16-geo --batch 128 --precisions bf16 \
  --dense-out-dim 65536 --steps 5 --warmup 2 --out "$OUT/step_bound-cuda-dense65536.json" | tail -8
step end to end
timeout 240 python3 bench/end_to_end.py --device cuda --presets vits16-dino,vits16-geo --batch 128 --workers 14 \
  --images 10240 --log-every 4 --precision bf16 --out "$OUT/end_to_end-cuda.json" | tail -12
if [ "${COMPILE_S:-0}" -gt 0 ]; then
  step compile
  timeout "$COMPILE_S" python3 bench/step_bound.py --device cuda --presets vits16-geo --batch 128 --precisions bf16 \
    --compile --steps 8 --warmup 3 --out "$OUT/step_bound-cuda-compile.json" | tail -8
fi
echo done
