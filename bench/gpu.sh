#!/usr/bin/env bash
# Run the extraction benchmark on a machine with a CUDA GPU, at the imagegpt-small shape
# (24 layers, width 512, 8 heads, seq 1024), in bf16 and then fp32, then the probe sweep with
# the torch engine on the GPU, and print the machine details the results need. Each run has a
# hard time limit, so the whole script stays under about 9 minutes. A run that hits its limit
# prints "timed out" and the script goes on.
#
# NOTE: this script has not run on a GPU yet, so its time limits are estimates.
#
# Usage, from the repository root:  bash bench/gpu.sh [PYTHON]
# PYTHON defaults to .venv/bin/python when it exists, else python3.
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ $# -ge 1 ]]; then
    PYTHON="$1"
elif [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python3
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"

# Exit status 1 at the end when any step failed; the remaining steps still run.
failed=0

echo "== nvidia-smi"
nvidia-smi || { echo "nvidia-smi failed"; failed=1; }
echo "== versions"
"$PYTHON" - <<'EOF'
import platform

import torch
import transformers

print("python", platform.python_version())
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("transformers", transformers.__version__)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
EOF

# 256 images in batches of 64: the naive path keeps 25 full float32 hidden states per batch
# (3.3 GB of host memory) and materialises 64 x 8 x 1024 x 1024 attention scores per layer.
# Three alternated rounds give a median; the limits leave room for a slow first CUDA start.
limited() {
    local limit="$1"
    shift
    echo "== $*"
    timeout "$limit" "$PYTHON" "$@"
    local status=$?
    if [[ $status -eq 124 ]]; then
        echo "timed out after ${limit}s: rerun with a smaller size"
        failed=1
    elif [[ $status -ne 0 ]]; then
        echo "$1 failed with exit status $status"
        failed=1
    fi
}

for dtype in bf16 fp32; do
    limited 110 bench/extract.py --layers 24 --width 512 --heads 8 --seq 1024 \
        --images 256 --batch 64 --rounds 3 --device cuda --dtype "$dtype"
done

# The probe sweep at the product's size: 25 layers x 8 values of C on 50,000 x 512 features.
# scikit-learn (one thread, as on the CPU) fits 3 evenly spaced layers, about 40 s each on the
# 2-core development CPU, and its time for all 25 is estimated in proportion.
limited 300 bench/probe.py --device cuda --dtype float32 float64 --sklearn-layers 3 --threads 1

exit $failed
