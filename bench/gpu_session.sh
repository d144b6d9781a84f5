#!/usr/bin/env bash
# The GPU checks and measurements of one call of a lent GPU (see the README's speed section; figures land
# in $OUT, then in bench/results/ with the GPU's name): the CUDA-only tests, the training step against its
# model arithmetic (both ways to the local targets), end to end with the photometric part on the device,
# dense out_dim 65536, and torch.compile when COMPILE_S > 0.
# Before the call, in the project root: bash ../shared/gpu/prepare-wheels.sh (pydantic for Python 3.12).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/glsd-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)"
step() { echo "== $* ($(date +%T))"; }
step CUDA tests
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_photometric.py tests/test_local_loss.py \
  -k "side_stream or gpu" 2>&1 | tail -4
step step bound
timeout 170 python3 bench/step_bound.py --device cuda --presets ${STEP_PRESETS:-vits16-dino,vits16-geo,swint-geo} \
  --batch 128 --precisions bf16 --steps 8 --warmup 3 --compare-local-targets --out "$OUT/step_bound-cuda.json" | tail -14
step end to end
timeout 180 python3 bench/end_to_end.py --device cuda --batch 128 --workers 14 --images 8192 --log-every 4 \
  --skip-steps 40 --loader-batches 12 --precision bf16 --out "$OUT/end_to_end-cuda.json" \
  --arms ${E2E_ARMS:-vits16-dino:device,vits16-geo:device} | grep -v "^wrote"
step dense out_dim 65536
timeout 70 python3 bench/step_bound.py --device cuda --presets vits16-geo --dense-out-dim 65536 --batch 128 \
  --precisions bf16 --steps 6 --warmup 2 --compare-local-targets --out "$OUT/step_bound-cuda-dense65536.json" | tail -9
if [ "${COMPILE_S:-0}" -gt 0 ]; then
  step compile
  timeout "$COMPILE_S" python3 bench/step_bound.py --device cuda --presets vits16-geo --batch 128 --precisions bf16 \
    --compile --steps 8 --warmup 3 --out "$OUT/step_bound-cuda-compile.json" | tail -8
fi
step done
