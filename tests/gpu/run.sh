#!/usr/bin/env bash
# The GPU checks, on one CUDA device, in a few minutes:
#   tests/gpu/run.sh            (inside the NVIDIA PyTorch container, from any directory)
# prints the environment check (`longsky doctor`), then runs tests/gpu/ (marker `gpu`):
# training steps with the local spec + our attention and with the TE spec + FP8 (and FP8
# attention), a CPU-written checkpoint loaded into the TE spec and used as init_from,
# TE's attention-backend choice against attention/te_rules.py, tensorwise + FP8 attention,
# packed rows, the local spec with the GPU defaults, train then evaluate in one process,
# needle / perplexity / greedy generation on the GPU, and a conversion round trip.
# Without CUDA every test is skipped; without Transformer Engine the TE tests are.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
unset LONGSKY_DEVICE
PY="${PYTHON:-python}"
"$PY" -m megatron_longsky.cli doctor || echo "(longsky doctor reported a problem: see above)"
# 8 minutes in all; the scenarios take about 3 on an H100 (each in a fresh process), the seven
# issue-21 scenarios about 2 more (estimated by reading: no GPU has run them yet).
exec timeout 480 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu "$@"
