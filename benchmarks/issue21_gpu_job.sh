#!/bin/bash
# Issue 21's next measurements on the lent GPU, as one background job that outlives each device call.
#
#   mkdir -p .carry/base && git archive 716019a torch_trt_module | tar -x -C .carry/base
#   run(command="bash benchmarks/issue21_gpu_job.sh 540", carry=[".carry"])   # starts it, waits 540 s
#   run(command="bash benchmarks/issue21_gpu_job.sh 540", carry=[".carry"])   # again within 30 s
#
# .carry/base holds the package as it was before the graph runners took the caller's dtypes
# (commit 716019a), so this job times the change against it on one host: the eighth session's two
# jobs ran on hosts three times apart in launch cost. Each call returns what the job has written so
# far as $OUT/job.tgz. The steps (mobilenet_v3_small fp16 over fp32 at batch 32, goal 1.3x):
#   A. before and after the change, at batch 32, fp32 and fp16, alternating in four processes;
#   P. the first convolution with 3, 4 and 8 input channels, timed under a CUDA graph
#      (bench_first_conv.py);
#   K. where the depthwise kernel's call loses what its layers win (profile_gpu_calls.py with and
#      without --dwconv-triton, fp16);
#   R. trtmodule, trtmodule-fp16 and torch.compile-fp16 at batches 1, 8 and 32, for the table
#      (on a fast host: eager mobilenet_v3_small at batch 1 near 2.6 ms).
# The eighth session's jobs (first: commit 716019a's version; second: 7d84a3e's) are in RESULTS.md.
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
  echo "=== $(date +%T) A: before (716019a) and after, alternating"
  for i in 1 2; do
    PYTHONPATH=$JOB/src/.carry/base TORCH_TRT_MODULE_CACHE=$JOB/cache_before timeout 200 $B --out $O/a_before$i > $O/a_before$i.log 2>&1
    echo "before $i:"; medians $O/a_before$i
    timeout 200 $B --out $O/a_after$i > $O/a_after$i.log 2>&1
    echo "after $i:"; medians $O/a_after$i
  done
  echo "=== $(date +%T) P: first convolution"
  timeout 200 python3 benchmarks/bench_first_conv.py --batch 32 > $O/p.log 2>&1; grep "^|" $O/p.log || tail -5 $O/p.log
  echo "=== $(date +%T) K: the depthwise kernel's call"
  (cd benchmarks && timeout 400 python3 profile_gpu_calls.py --model mobilenet_v3_small --batch-sizes 32 \
     --rows "trtmodule fp16" --top 16 --dwconv-triton float16 --dwconv-tile 1024x2) > $O/k.log 2>&1
  grep -v Warning $O/k.log | tail -30
  echo "=== $(date +%T) R: the fp16 cells"
  timeout 600 python3 benchmarks/bench_latency.py --models mobilenet_v3_small --batch-sizes 1,8,32 \
    --backends eager,trtmodule,trtmodule-fp16,torch.compile-fp16 --max-seconds 1.5 --out $O/r > $O/r.log 2>&1; medians $O/r
  echo "=== $(date +%T) end"
  touch $O/DONE
  exit 0
fi
end=$((SECONDS + WAIT))
while [ $SECONDS -lt $end ] && [ ! -e $JOB/out/DONE ]; do sleep 5; done
tail -c 8000 $JOB/out/job.log
tar -czf "$OUT/job.tgz" -C $JOB out
[ -e $JOB/out/DONE ] && echo "JOB DONE" || echo "JOB RUNNING"
