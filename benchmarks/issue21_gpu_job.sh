#!/bin/bash
# Issue 21's next measurements on the lent GPU, as one background job that outlives each device call.
#
#   run(command="bash benchmarks/issue21_gpu_job.sh 540")   # starts the job, waits up to 540 s
#   run(command="bash benchmarks/issue21_gpu_job.sh 540")   # again within 30 s: waits for the rest
#
# Each call returns what the job has written so far as $OUT/job.tgz (logs, JSONs). The steps, in the
# order that decides the issue (mobilenet_v3_small fp16 over fp32 at batch 32, 1.24x, goal 1.3x):
#   A. the defaults at batch 32, fp32 and fp16 (the baseline of this job);
#   B. the depthwise kernel against cuDNN layer by layer (bench_dwconv.py);
#   C. the call with the kernel for both dtypes, at B's best fp16 tile;
#   E. where the call's time goes (profile_gpu_calls.py: synced time, kernels, host ops);
#   D. Inductor's max_autotune (Triton GEMM templates with the bias and activation fused);
#   F. where the kernel won in C: its GPU tests and mobilenet_v3_small's full row with it
#      (skipped when ISSUE21_F=0: the row alone takes about 15 minutes).
WAIT=${1:-540}
JOB=/tmp/issue21
if [ ! -e $JOB/started ]; then
  mkdir -p $JOB/out && touch $JOB/started
  cp -r . $JOB/src
  setsid nohup bash $JOB/src/benchmarks/issue21_gpu_job.sh steps > $JOB/out/job.log 2>&1 < /dev/null &
  echo "started"
fi
if [ "$1" = steps ]; then
  cd $JOB/src || exit 1
  O=$JOB/out
  export PYTHONUNBUFFERED=1 PYTHONPATH=$JOB/src TORCH_TRT_MODULE_CACHE=$JOB/cache
  nvidia-smi -L
  B="python3 benchmarks/bench_latency.py --models mobilenet_v3_small --batch-sizes 32 --backends trtmodule,trtmodule-fp16 --max-seconds 3 --iters 60"
  medians() {  # backend median_ms, from a bench_latency output folder
    python3 -c "import json,glob,sys; [print(r['backend'], r['median_ms']) for f in glob.glob(sys.argv[1] + '/*.json') for r in json.load(open(f))['rows']]" "$1"
  }
  echo "=== $(date +%T) A: defaults"
  timeout 200 $B --out $O/a > $O/a.log 2>&1; medians $O/a
  echo "=== $(date +%T) B: per layer"
  (cd benchmarks && timeout 200 python3 bench_dwconv.py --batch 32 --tiles 2048x4,1024x2,512x2,1024x4 --json $O/dw.json) > $O/b.log 2>&1
  grep -E "^\| \*\*all|^\| [0-9]+ |host|Error" $O/b.log
  TILE=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['float16']; d.pop('cudnn'); print(min(d, key=d.get))" $O/dw.json 2>/dev/null || echo 1024x2)
  echo "=== $(date +%T) C: the kernel for both dtypes, tile $TILE"
  timeout 200 $B --dwconv-triton float16,float32 --dwconv-tile $TILE --out $O/c > $O/c.log 2>&1; medians $O/c
  PICK=$(python3 - $O/a $O/c <<'PY'
import glob, json, sys
def med(d):
    return {r["backend"]: r["median_ms"] for f in glob.glob(d + "/*.json") for r in json.load(open(f))["rows"] if r.get("median_ms")}
a, c = med(sys.argv[1]), med(sys.argv[2])
print(",".join(dt for dt, be in (("float32", "trtmodule"), ("float16", "trtmodule-fp16"))
               if a.get(be) and c.get(be) and c[be] < 0.97 * a[be]))
PY
)
  echo "kernel wins for: [$PICK]"
  echo "=== $(date +%T) E: profile"
  (cd benchmarks && timeout 300 python3 profile_gpu_calls.py --model mobilenet_v3_small --batch-sizes 32 --rows trtmodule \
     --top 14 --host-top 12) > $O/e.log 2>&1; grep -v Warning $O/e.log | tail -60
  echo "=== $(date +%T) D: max_autotune"
  timeout 420 $B --inductor-options '{"max_autotune": true}' --out $O/d > $O/d.log 2>&1; medians $O/d
  grep -h "first call\|trtmodule.*|" $O/d.log | head -4
  if [ -n "$PICK" ] && [ "${ISSUE21_F:-1}" = 1 ]; then
    echo "=== $(date +%T) F: the kernel's GPU tests and the full row with it"
    timeout 400 python3 -m pytest -q tests/gpu/test_dwconv_cuda.py > $O/f_tests.log 2>&1; tail -3 $O/f_tests.log
    timeout 900 python3 benchmarks/bench_latency.py --models mobilenet_v3_small --batch-sizes 1,8,32 \
      --backends eager,eager-fp16,torch.compile,torch.compile-fp16,torch.compile-reduce-overhead,trtmodule,trtmodule-fp16,trtmodule+cudagraphs,trtmodule@cuda_graphs=False,trtmodule-fp16@cuda_graphs=False \
      --max-seconds 1.5 --dwconv-triton $PICK --dwconv-tile $TILE --out $O/f > $O/f.log 2>&1; medians $O/f
  fi
  echo "=== $(date +%T) end"
  touch $O/DONE
  exit 0
fi
end=$((SECONDS + WAIT))
while [ $SECONDS -lt $end ] && [ ! -e $JOB/out/DONE ]; do sleep 5; done
tail -c 8000 $JOB/out/job.log
tar -czf "$OUT/job.tgz" -C $JOB out
[ -e $JOB/out/DONE ] && echo "JOB DONE" || echo "JOB RUNNING"
