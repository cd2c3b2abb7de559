#!/bin/bash
# Mutation testing, GPU half: re-run mutants that survive the CPU tests against the adapter's CUDA
# tests (tests/gpu/test_tensorrt_adapter_cuda.py and the gpu-marked tests of tests/backends), on a
# machine with CUDA GPUs (two for the device-guard tests).
#
#   bash benchmarks/mutants_on_gpu.sh MUTANTS_DIR LIST_FILE
#
# MUTANTS_DIR: the trampolined copy `mutmut run` writes (mutants/), with the current tests copied in;
# LIST_FILE: one mutant name per line (`mutmut results`). Each mutant runs in a fresh process: mutmut's
# own workers are forked, and a process forked after CUDA is initialised fails every CUDA test, which
# would count as kills. Prints "NAME rc=1 FAILED <test>" (killed) or "NAME rc=0" (survived).
# benchmarks/RESULTS.md, "Mutation testing (TensorRT adapter)", has the results.
set -u
MUT=$(cd "$1" && pwd); LIST=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$MUT"
export PYTHONPATH=$MUT:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export G="tests/gpu/test_tensorrt_adapter_cuda.py tests/backends/test_cudagraphs.py tests/backends/test_stream_ordering.py"
MUTANT_UNDER_TEST= python3 -m pytest -q -m gpu -p no:cacheprovider $G | tail -1  # the clean run must pass
one() {
  log=$(mktemp)
  MUTANT_UNDER_TEST=$1 timeout 150 python3 -m pytest -x -q -m gpu -p no:cacheprovider $G > "$log" 2>&1
  rc=$?; echo "$1 rc=$rc $(grep -m1 -E '^(FAILED|ERROR)' "$log" | cut -c1-170)"; rm -f "$log"
}
export -f one
xargs -a "$LIST" -P "${JOBS:-8}" -I{} bash -c 'one "$@"' _ {}
