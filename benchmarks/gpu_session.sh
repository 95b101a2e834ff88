#!/usr/bin/env bash
# The GPU session's one script: the profile of the paper-size training step, then the gpu suite
# (the lever ladder, bf16 against fp32, memory), each figure as JSON under $OUT (or runs/gpu).
# Sized to finish in about 5 minutes on one H200; run from the repository root with the
# project's environment:  bash benchmarks/gpu_session.sh
# A failing step is reported and the next still runs: a GPU session is too rare to lose.
set -uo pipefail
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export OUT="$out" PYTHONPATH="platform:.${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-.venv/bin/python}"
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt" || status=1
for suite in gpu-profile gpu; do
    SECONDS=0
    "$py" -m jobs.benchmark "$suite" --config jobs/configs/paper.toml --json "$out/$suite.json" \
        2>&1 | tee "$out/$suite.log" || { status=1; echo "$suite failed (see $out/$suite.log)"; }
    echo "$suite: ${SECONDS} s"
done
exit "$status"
