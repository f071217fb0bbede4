#!/bin/bash
# The GPU checks of a 7B site, on one CUDA machine, from a kit packed by benchmarks/offline_kit.sh (no network there):
# the `gpu` tests, the throughput benchmark at TinyLlama-1.1B's shapes (batch 8, sequence cap 512, rank 8), and the scale
# benchmark at LLaMA-2-7B's shapes through the warm worker with a declared 12 GB per node. Logs go to OUT (default
# /tmp/fedpipe-gpu); each stage has its own time limit (TESTS_S, THROUGHPUT_S, SCALE_S seconds).
#     bash benchmarks/gpu_checks.sh [KIT]
set -o pipefail
cd "$(dirname "$0")/.."
kit=${1:-.kit}
out=${OUT:-/tmp/fedpipe-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FEDPIPE_CACHE_DIR=${FEDPIPE_CACHE_DIR:-/tmp/fedpipe-cache}
started=$(date +%s)
stage() { echo "== $(($(date +%s) - started)) s: $*"; }
stage install
site=/tmp/fedpipe-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$kit"/wheels/*.whl || exit 1
export PYTHONPATH=$site:$PWD/$kit/site:$PWD PATH=$site/bin:$PATH
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes, flwr
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'flwr', flwr.__version__)"
stage "SmolLM2-135M's architecture, random weights"
mkdir -p "$FEDPIPE_CACHE_DIR/models" && tar xJf "$kit/smollm2-135m.tar.xz" -C "$FEDPIPE_CACHE_DIR/models"
python3 -c "import sys, torch; from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0); d = sys.argv[1]; AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).save_pretrained(d)" \
  "$FEDPIPE_CACHE_DIR/models/smollm2-135m" || exit 1
stage "gpu tests"
timeout "${TESTS_S:-150}" python3 -m pytest -m gpu tests/test_device.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -15
stage "throughput, TinyLlama-1.1B's shapes"
timeout "${THROUGHPUT_S:-150}" python3 benchmarks/throughput.py --model tinyllama-1.1b --device cuda --batch 8 --seq 512 \
  --steps 8 --rank 8 2>&1 | tee "$out/throughput.log" | tail -12
stage "scale, LLaMA-2-7B's shapes, warm worker, 12 GB declared"
timeout "${SCALE_S:-280}" python3 benchmarks/scale.py --model llama2-7b --device cuda --memory-gb 12 --batch 8 --seq 512 \
  --rounds 2 --steps 2 --eval-where sites --modes worker --workdir /tmp/fedpipe-scale --timeout-s 260 2>&1 |
  tee "$out/scale.log" | tail -25
stage done
for log in /tmp/fedpipe-scale/worker/worker-*.log; do [ -f "$log" ] && tail -5 "$log"; done
cp /tmp/fedpipe-scale/worker/runs/*/metrics.jsonl "$out/" 2>/dev/null
exit 0
