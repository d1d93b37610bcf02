#!/usr/bin/env bash
# Every GPU claim of alldetect, measured in one unattended run meant to take under 6 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh OUTDIR           on a CUDA machine
#   benchmarks/gpu_check.sh OUTDIR --smoke   the same code paths on a CPU, tiny sizes (a test runs this)
#
# On a fresh GPU machine, from the repository root, install first with the project's own command:
#   make .venv/.installed TORCH="torch==2.14.1 torchvision==0.29.1"
# Results: OUTDIR/gpu_check.md and OUTDIR/gpu_check.json; the last line is `gpu_check: ok` when every section ran.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--smoke]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=.venv/bin/python
[ -x "$py" ] || py=python3
# onnxruntime's CUDA provider, when the registry has onnxruntime-gpu: installed beside the CPU build, not over it
if [ "${1:-}" != "--smoke" ] && ! "$py" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  if timeout 30 "$py" -m pip install --quiet --retries 0 --timeout 5 --no-deps --target "$out/ort-gpu" onnxruntime-gpu >/dev/null 2>&1; then
    export PYTHONPATH="$out/ort-gpu${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "onnxruntime-gpu did not install from the registry; the ONNX Runtime CUDA row will say so"
  fi
fi
exec "$py" benchmarks/gpu_check.py "$out" "$@"
