#!/usr/bin/env bash
# The GPU session's one script: the profile of the paper-size training step, then the gpu suite
# (the lever ladder, bf16 against fp32, memory), each figure as JSON under $OUT (or runs/gpu).
# Sized to finish in about 5 minutes on one H200; run from the repository root with the
# project's environment:  bash benchmarks/gpu_session.sh
set -euo pipefail
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export OUT="$out" PYTHONPATH="platform:.${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
time "$py" -m jobs.benchmark gpu-profile --config jobs/configs/paper.toml --json "$out/profile.json" \
    2>&1 | tee "$out/profile.log"
time "$py" -m jobs.benchmark gpu --config jobs/configs/paper.toml --json "$out/gpu.json" \
    2>&1 | tee "$out/gpu.log"
