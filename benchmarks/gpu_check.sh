#!/usr/bin/env bash
# GPU check of the real workload's shape: an 8B policy and an 8B reward model (random weights,
# built on the GPU), decode-step cost vs the weight-read floor, prompts per minute at
# max_prompts 1/8/32/64 for the token-level engine and the lockstep ablation, eager vs compiled decode
# steps, the paper's loop, peak memory. Needs torch, transformers and a CUDA
# GPU; nothing is downloaded; mahalo is imported from this working tree. Writes
# ${OUT:-gpu_check_out}/gpu_check.json. About 3-5 minutes on one H200 (not yet measured).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
