#!/bin/bash
# Issue 21's next measurements on the lent GPU, as one background job that outlives each device call.
#
#   rm -rf .carry/base && mkdir -p .carry/base && git archive 161c9ad torch_trt_module | tar -x -C .carry/base
#   run(command="bash benchmarks/issue21_gpu_job.sh 540", carry=[".carry"])   # starts it, waits 540 s
#   run(command="bash benchmarks/issue21_gpu_job.sh 540", carry=[".carry"])   # again within 30 s
#
# .carry/base holds the package as it was before follow mode's fast call looked at the weights
# after its run (commit 161c9ad), so this job times the change against it on one host. .carry/whl
# holds the wheels the device's Python lacks for the tests (pytest and its two dependencies).
# Each call returns what the job has written so far as $OUT/job.tgz. The steps
# (mobilenet_v3_small fp16 over fp32 at batch 32, goal 1.3x):
#   A. before and after the change, at batch 32, fp32 and fp16, in one process each (ROUNDS="1 2": two rounds, alternating; ARMS picks the arms from "before after layout nopad",
#      default "before after layout"; "nopad": --pad-channels off, the first convolution's 3 channels
#      not padded), the arm "layout" with the graphs' static inputs in the runner's layout (--graph-inputs runner);
#   S (only when STEPS names it): batch 32 timed as the only shape, and after batches 1 and 8 (the
#      full row's order: the third signature is torch.compile's dynamic program unless --max-static
#      raises the number compiled statically); SFLAGS adds bench_latency options;
#   T. the GPU tests of the change: follow mode's look after the run, streams, real graphs;
#   R. mobilenet_v3_small's full row (the issue's eight backends, batches 1, 8 and 32; RFLAGS adds
#      bench_latency options, e.g. RFLAGS="--pad-channels off");
#   W (only when STEPS names it): the whole table, each model's row in its own process, in the order
#      of MODELS (default: resnet18 resnet50 vit_b_16 bert-base; mobilenet_v3_small's row was run with
#      these defaults in the eleventh session), with
#      --max-seconds 1.5 and the issue's eight backends, as RESULTS.md's H100 table (run in the
#      twelfth session);
#   U (only when STEPS names it; after W): every GPU test (tests/gpu and the real graphs of
#      test_cudagraphs.py), alone: STEPS=U (about 10 minutes or more, not yet timed whole);
#   C (only when STEPS names it): the channel padding on and off, resnet18, resnet50 and vit_b_16 at
#      batch 32 (trtmodule, trtmodule-fp16), one process each;
#   F (only when STEPS names it): bench_first_conv.py, the first convolution's input channels padded;
#   G (only when STEPS names it): bench_graph_launch.py, a graph's launch cost by the kind of its nodes;
#   P (only when STEPS names it, e.g. STEPS="P T"): profile_gpu_calls.py's timeline of the synced call
#      (lead, span, busy, gaps) and each call's device work in order, with both static input layouts.
# The eleventh session's defaults (the channels padded, four static signatures) were timed by
#   STEPS="W U" bash benchmarks/issue21_gpu_job.sh 570   (then again, within 30 s, until JOB DONE;
#   W took 17 minutes on a fresh H100 in the twelfth session, and U did not finish: run STEPS=U next)
# Earlier jobs (the eighth session's: commits 716019a and 7d84a3e) are in RESULTS.md.
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
  whl=""
  for m in pytest iniconfig pluggy filelock onnxscript onnx_ir tqdm; do
    python3 -c "import $m" 2>/dev/null || whl="$whl $(ls .carry/whl/${m}-*.whl)"
  done
  [ -n "$whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $JOB/site $whl
  export PYTHONUNBUFFERED=1 PYTHONPATH=$JOB/src:$JOB/site TORCH_TRT_MODULE_CACHE=$JOB/cache
  nvidia-smi -L
  B="python3 benchmarks/bench_latency.py --models mobilenet_v3_small --batch-sizes 32 --backends trtmodule,trtmodule-fp16 --max-seconds 3 --iters 60"
  medians() {  # backend median_ms, from a bench_latency output folder
    python3 -c "import json,glob,sys; [print(r['backend'], r['batch'], round(r['median_ms'], 4)) for f in glob.glob(sys.argv[1] + '/*.json') for r in json.load(open(f))['rows'] if r.get('median_ms')]" "$1"
  }
  has() { case " ${STEPS:-A T R} " in *" $1 "*) return 0;; esac; return 1; }
  if has G; then
    echo "=== $(date +%T) G: a CUDA graph's launch, by the kind of its nodes"
    timeout 180 python3 benchmarks/bench_graph_launch.py > $O/g.log 2>&1; cat $O/g.log | cut -c1-400
  fi
  if has F; then
    echo "=== $(date +%T) F: the first convolution with its 3 input channels padded to 4 or 8"
    timeout 180 python3 benchmarks/bench_first_conv.py --batch 32 > $O/f.log 2>&1; grep "^|" $O/f.log || tail -5 $O/f.log
  fi
  if has P; then
    echo "=== $(date +%T) P: where the synced call's time goes, fp32 and fp16, caller's and runner's input layout"
    for g in ${LAYOUTS:-caller runner}; do
      timeout 300 python3 benchmarks/profile_gpu_calls.py --batch-sizes 32 --rows trtmodule --top 0 --host-top 10 \
        --graph-inputs $g --timeline $O/timeline_$g > $O/p_$g.log 2>&1; grep -E "^\||timeline|host:" $O/p_$g.log
    done
  fi
  has A && echo "=== $(date +%T) A: before (161c9ad), after, after with channels_last static inputs, alternating"
  has A && for i in ${ROUNDS:-1}; do
    if [[ " ${ARMS:-before after layout} " == *" before "* ]]; then
      PYTHONPATH=$JOB/src/.carry/base TORCH_TRT_MODULE_CACHE=$JOB/cache_before timeout 200 $B --out $O/a_before$i > $O/a_before$i.log 2>&1
      echo "before $i:"; medians $O/a_before$i
    fi
    if [[ " ${ARMS:-before after layout} " == *" after "* ]]; then
      timeout 200 $B --out $O/a_after$i > $O/a_after$i.log 2>&1
      echo "after $i:"; medians $O/a_after$i
    fi
    if [[ " ${ARMS:-before after layout} " == *" layout "* ]]; then
      timeout 200 $B --graph-inputs runner --out $O/a_layout$i > $O/a_layout$i.log 2>&1
      echo "after, static inputs channels_last $i:"; medians $O/a_layout$i
    fi
    if [[ " ${ARMS:-before after layout} " == *" nopad "* ]]; then
      timeout 200 $B --pad-channels off --out $O/a_nopad$i > $O/a_nopad$i.log 2>&1
      echo "after, first convolution's channels not padded $i:"; medians $O/a_nopad$i
    fi
  done
  has S && echo "=== $(date +%T) S: batch 32 as the first shape, and as the third (after 1 and 8), static or dynamic"
  has S && for i in ${ROUNDS:-1}; do
    for arm in "32" "1,8,32" "1,8,32 --max-static 4"; do
      tag=$(echo "$arm" | tr -dc '0-9a-z')
      timeout 200 python3 benchmarks/bench_latency.py --models mobilenet_v3_small --batch-sizes $arm \
        --backends trtmodule,trtmodule-fp16 --max-seconds 1.5 ${SFLAGS} --out $O/s_$tag$i > $O/s_$tag$i.log 2>&1
      echo "batches $arm ${SFLAGS} $i:"; medians $O/s_$tag$i | grep " 32 "
    done
  done
  has T && echo "=== $(date +%T) T: GPU tests of the change" && timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_optimized_runtime.py \
    tests/gpu/test_cuda.py tests/backends/test_cudagraphs.py -k "looks_after or streams or real_cuda or padded_input_channels" > $O/t.log 2>&1
  has T && tail -5 $O/t.log
  if has W; then
    echo "=== $(date +%T) W: the whole table"
    for model in ${MODELS:-resnet18 resnet50 vit_b_16 bert-base}; do
      bs=1,8,32; [ $model = resnet50 ] && bs=1,8,32,128
      timeout 900 python3 benchmarks/bench_latency.py --models $model --batch-sizes $bs \
        --backends eager,eager-fp16,torch.compile,torch.compile-fp16,torch.compile-reduce-overhead,trtmodule,trtmodule-fp16,trtmodule+cudagraphs \
        --max-seconds 1.5 ${WFLAGS} --out $O/w_$model > $O/w_$model.log 2>&1
      echo "$(date +%T) $model:"; medians $O/w_$model | tr '\n' ';'; echo
    done
  fi
  if has U; then  # every GPU test (the README's suite's GPU half)
    echo "=== $(date +%T) U: tests/gpu"
    timeout 900 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/backends/test_cudagraphs.py > $O/u.log 2>&1; tail -8 $O/u.log
  fi
  if has C; then
    echo "=== $(date +%T) C: channel padding on and off, batch 32"
    for model in resnet18 resnet50 vit_b_16; do
      for pad in on off; do
        timeout 300 python3 benchmarks/bench_latency.py --models $model --batch-sizes 32 --backends trtmodule,trtmodule-fp16 \
          --max-seconds 1.5 --pad-channels $pad --out $O/c_$model$pad > $O/c_$model$pad.log 2>&1
        echo "$model pad $pad:"; medians $O/c_$model$pad
      done
    done
  fi
  has R && echo "=== $(date +%T) R: the full row" && timeout 600 python3 benchmarks/bench_latency.py --models mobilenet_v3_small --batch-sizes 1,8,32 \
    --backends eager,eager-fp16,torch.compile,torch.compile-fp16,torch.compile-reduce-overhead,trtmodule,trtmodule-fp16,trtmodule+cudagraphs \
    --max-seconds 1.5 ${RFLAGS} --out $O/r > $O/r.log 2>&1 && medians $O/r
  echo "=== $(date +%T) end"
  touch $O/DONE
  exit 0
fi
end=$((SECONDS + WAIT))
while [ $SECONDS -lt $end ] && [ ! -e $JOB/out/DONE ]; do sleep 5; done
tail -c 8000 $JOB/out/job.log
tar -czf "$OUT/job.tgz" -C $JOB out
[ -e $JOB/out/DONE ] && echo "JOB DONE" || echo "JOB RUNNING"
