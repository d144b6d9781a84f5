#!/usr/bin/env bash
# The GPU checks and measurements of one call of a lent GPU (see the README's speed section; figures land
# in $OUT, then in bench/results/ with the GPU's name). PARTS picks and orders them (default: all but
# profile):
#   tests    the CUDA-only tests (side-stream batch preparation, the local loss on the GPU)
#   step     the training step against its model arithmetic (both ways to the local targets)
#   e2e      end to end, photometric part on the device (E2E_ARMS)
#   dense    vits16-geo with dense out_dim 65536
#   profile  torch.profiler tables of a vits16-geo step and of the device photometric pass
#   compile  vits16-geo eager and with run.compile
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
for part in ${PARTS:-tests step e2e dense compile}; do
  step "$part"
  case $part in
    tests) timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_photometric.py tests/test_local_loss.py \
             -k "side_stream or gpu" --tb=short 2>&1 | tail -25 ;;
    step) timeout 170 python3 bench/step_bound.py --device cuda --presets ${STEP_PRESETS:-vits16-dino,vits16-geo,swint-geo} \
            --batch 128 --precisions bf16 --steps 8 --warmup 3 --compare-local-targets \
            --out "$OUT/step_bound-cuda.json" | tail -14 ;;
    e2e) timeout 180 python3 bench/end_to_end.py --device cuda --batch 128 --workers 14 --images 8192 --log-every 4 \
           --skip-steps 40 --loader-batches 12 --precision bf16 --out "$OUT/end_to_end-cuda.json" \
           --arms ${E2E_ARMS:-vits16-dino:device,vits16-geo:device} | grep -v "^wrote" ;;
    dense) timeout 70 python3 bench/step_bound.py --device cuda --presets vits16-geo --dense-out-dim 65536 --batch 128 \
             --precisions bf16 --steps 6 --warmup 2 --compare-local-targets \
             --out "$OUT/step_bound-cuda-dense65536.json" | tail -9 ;;
    profile) timeout 90 python3 bench/profile_step.py --device cuda --preset vits16-geo --batch 128 --rows 25 \
               --out "$OUT/profile_step-cuda.txt" > /dev/null && echo "wrote profile_step-cuda.txt" ;;
    compile) timeout "${COMPILE_S:-150}" python3 bench/step_bound.py --device cuda --presets vits16-geo --batch 128 \
               --precisions bf16 --compile --steps 8 --warmup 3 --out "$OUT/step_bound-cuda-compile.json" | tail -8 ;;
  esac
done
step done
