#!/usr/bin/env bash
# The GPU path in one go, on a CUDA machine: the CUDA tests, then benchmarks/gpu_step.py's training
# and linear-evaluation figures. Each part has a time limit and writes its log to $OUT (default
# /tmp/gpu_check) as it runs, so a part cut short still leaves what it printed.
#
#   bash benchmarks/gpu_check.sh                    # env tests train linear_eval
#   bash benchmarks/gpu_check.sh env train          # some parts only
#   bash benchmarks/gpu_check.sh vit cudagraphs     # not in the default set: ViT-S/16 with AdamW;
#                                                   # fpipe's ResNet step under CUDA graphs
#   bash benchmarks/gpu_check.sh first_calls        # each compile alone in a fresh process, empty caches:
#                                                   # the fair first-call ratio (in one process the
#                                                   # programs compiled later reuse the earlier's setup)
#   bash benchmarks/gpu_check.sh diagnose           # where linear eval's first call and its steps spend
#                                                   # their time: the compile alone under cProfile (and
#                                                   # where each Triton kernel was compiled: in the process
#                                                   # or by inductor's workers), 3 steps of each program
#                                                   # under torch.profiler, then the compile with every
#                                                   # kernel compiled in the process (about 7 minutes)
#   bash benchmarks/gpu_check.sh second_run         # the main job compiled, twice: the second loads the first's
#                                                   # steps (the goal: training starts within 5 s)
#   bash benchmarks/gpu_check.sh cudnn_fusion       # the frozen R50 trunk with cuDNN's fused conv+bias+ReLU
#                                                   # against fpipe's compiled trunk (linear eval's 1.15x)
#   bash benchmarks/gpu_check.sh train linear_eval+tests   # a+b: side by side (the tests' compiles
#                                                   # then slow linear eval's first calls, not its steps)
#   DEADLINE=560 bash benchmarks/gpu_check.sh ...   # no part runs past 560 s from the start
#
# Compiling takes minutes there (H200 machine, torch 2.11, 2026-12-04): ResNet-50 224 px b256
# train step fpipe 114-139 s, torch.compile(nn.Module) 39-56 s (compiled after fpipe's, in the same
# process); linear eval fpipe 52-65 s (the frozen trunk and the heads' step), compiled 11-14 s;
# ViT-S/16 fpipe 92 s. The limits below fit them; the default parts need about 9 minutes, so a
# 15-minute lease holds them and little else; first_calls needs about 7.

# Wheels in .whl/ (packages the machine lacks: ml-collections, tensorboardX) are installed first,
# without an index; fetch them where pip works (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform any -d .whl ml-collections tensorboardX
# A 2-process NCCL run needs two GPUs (NCCL refuses two ranks on one device);
# tests/test_distributed.py covers the same reductions over gloo on CPU.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" FPIPE_COMPILE_CACHE=""
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then  # installed once per machine; on the path every run
  [ -d /tmp/fpipe-site ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fpipe-site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/fpipe-site"
fi

TEST_TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo --timeout=180)  # a hung test fails alone

part() {  # part NAME SECONDS COMMAND...: runs COMMAND with a limit, output to the screen and $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  if [ -n "${DEADLINE:-}" ] && [ $((DEADLINE - SECONDS)) -lt "$limit" ]; then limit=$((DEADLINE - SECONDS)); fi
  if [ "$limit" -le 0 ]; then echo "== $name: skipped, past DEADLINE"; return; fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}

run_part() {
  case $1 in
    env) part env 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'" ;;
    tests) part tests 200 $PY -m pytest -v -p no:cacheprovider -n 4 $TEST_TIMEOUT tests/test_cuda.py tests/test_data_cuda.py ;;  # -v: each result named as it lands
    train) part train 280 $PY benchmarks/gpu_step.py --parts train --no-cudagraphs ;;
    linear_eval) part linear_eval 130 $PY benchmarks/gpu_step.py --parts linear_eval ;;
    first_calls) part first_calls 420 $PY benchmarks/gpu_step.py --parts train linear_eval --first-calls-alone --no-cudagraphs ;;
    cudagraphs) part cudagraphs 220 $PY benchmarks/gpu_step.py --parts train --programs fpipe_cudagraphs eager ;;
    diagnose) part diagnose_compile 150 $PY benchmarks/gpu_step.py --parts linear_eval --first-calls-alone --programs fpipe --profile-first-call 40
              part diagnose_steps 150 $PY benchmarks/gpu_step.py --parts linear_eval --rounds 2 --trace-steps 3
              # last: every kernel compiled in the process, so the profile shows each compile, not a wait
              part diagnose_compile_serial 150 env TORCHINDUCTOR_COMPILE_THREADS=1 $PY benchmarks/gpu_step.py --parts linear_eval --first-calls-alone --programs fpipe --profile-first-call 40 ;;
    second_run) part second_run 240 bash -c 'd=$(mktemp -d); for i in 1 2; do s=$SECONDS
                  '"$PY"' main.py --config=configs/linear_eval.py --config.compile_min_images=0 --config.compile_cache_dir=$d/cache \
                    --workdir=$d/run$i 2>&1 | grep -E "compiled in|loaded and run in|Loaded the compiled|Saved the compiled|FAILED|Error|top1="
                  echo "main job run $i: $((SECONDS - s)) s"; done; rm -rf "$d"' ;;
    cudnn_fusion) part cudnn_fusion 150 $PY benchmarks/cudnn_fusion.py ;;
    vit) part vit 240 $PY benchmarks/gpu_step.py --parts train --arch vit_s16 --optimizer adamw --batch-size 128 --no-cudagraphs ;;
    *) echo "unknown part $1; valid: env tests train linear_eval first_calls cudagraphs diagnose second_run cudnn_fusion vit"; return 2 ;;
  esac
}

PARTS=${*:-env tests train linear_eval}
for q in ${PARTS//+/ }; do  # every name checked before anything runs
  case $q in env|tests|train|linear_eval|first_calls|cudagraphs|diagnose|second_run|cudnn_fusion|vit) ;; *) run_part "$q"; exit 2 ;; esac
done
for p in $PARTS; do
  for q in ${p//+/ }; do run_part "$q" & done  # a+b: side by side
  wait
done
