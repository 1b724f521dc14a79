#!/usr/bin/env bash
# Every GPU measurement of issue 26 in one call of the device tool (a lease is 15 minutes of device time, the
# start included): each benchmark under its own time budget (about 10 minutes in all), results as JSON in $OUT
# (the device tool's output folder; benchmarks/results/local here), with the GPU, driver and library versions.
#   bash benchmarks/gpu_session.sh
# Each script compares side by side in the same run (reference loop vs ours, eager vs compiled, Lightning vs plain
# loop) and reports model FLOP utilisation against a bf16 matmul measured in the same run. The device machine has
# no hydra-core/omegaconf/wandb: carry them as wheels (pip install --no-index --find-links wheels ...) first.
set -u
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
python -c "import torch, pytorch_lightning, timm; print('torch', torch.__version__, 'lightning',
pytorch_lightning.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)" > "$OUT/versions.txt" 2>&1
run() {  # run BUDGET_S COMMAND...: a failure or a timeout is written down, the session goes on
  local budget=$1
  shift
  echo "== $*" >> "$OUT/session.log"
  timeout "$budget" "$@" >> "$OUT/session.log" 2>&1 || echo "FAILED or over ${budget} s: $*" >> "$OUT/failures.txt"
}
# The GPU-only tests (real streams, CUDA generators, fused AdamW, pipelined sampler) first: seconds.
run 120 python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_decode_overlap.py \
  tests/test_sampler_pipelining.py tests/test_gpu_efficiency.py tests/test_procedures.py tests/test_discrete_noise.py
# Pre-training and fine-tuning steps of ViT-B at 224: Lightning vs a plain loop, eager vs compiled.
run 200 python benchmarks/train_throughput.py --device cuda --models vit_base_patch16 --batch 128 --img-size 224 \
  --steps 20 --out "$OUT/train_throughput_cuda.json"
# Certification: the reference loop vs our sampler, default (bf16) / fp32, eager / compiled.
run 180 python benchmarks/certify_throughput.py --device cuda --models vit_base_patch16 --img-size 224 \
  --num-classes 1000 --n 2000 --images 4 --precision default 32-true --compile --out "$OUT/certify_throughput_cuda.json"
# The JPEG pipelines: PIL and tensor workers vs the device decode.
run 90 python benchmarks/data_throughput.py --device cuda --workers 4 8 --images 2048 --batch 256 \
  --out "$OUT/data_throughput_cuda.json"
echo "done: $(ls "$OUT")" >> "$OUT/session.log"
