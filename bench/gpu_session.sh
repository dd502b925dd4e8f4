#!/usr/bin/env bash
# Every GPU measurement in one prepared run, for a GPU lent for a few minutes: run it from the repository root.
#
#   bash bench/gpu_session.sh [RESULTS_TAR] [SECONDS] [STAGES]
#
# Stages (STAGES: a comma list, default env,smoke,kernels,memory,sampling), each with its own time limit so that a
# hang or a slow stage cannot take the others' time (SECONDS, default 480, is the whole run's budget; the memory
# stage gets most of what is left, the sampling stage the rest):
#   env      the device, driver and library versions; wheels in .whl/ (bitsandbytes, optimum-quanto, liger-kernel,
#            num2words, for a machine without a package index: bench/gpu_wheels.sh downloads them) go to /tmp/site;
#            the package is installed --no-deps
#   smoke    bench/gpu_smoke.py: every op with both backends, and adaptations on tiny + SmolVLM-256M, in bf16
#   kernels  logprob_entropy, linear_logprob_entropy and linear_grpo_loss at [2048|8192, 151936] (H 1536), bf16,
#            fwd and fwd+bwd, against TRL's eager path (reimplemented), torch.compile and Liger
#   memory   bench/bench_memory.py on CUDA: Qwen2-VL-2B (none, nf4, int4), SmolVLM-256M and -500M (none, nf4),
#            N 8 and 16, 64 new tokens, --memory-budget 6GB, ttrv against the TRL-style step, per-phase peaks
#   sampling the sampling phase alone on SmolVLM-256M: shared-prefix decoding against generate(num_return_sequences)
# The random-weight model folders are built in the background while the smoke test runs (CPU work). Results are
# written under bench/results/ (*_cuda.csv, memory_gpu.*); with RESULTS_TAR they are also packed into that file after
# every stage (a run stopped by its time limit keeps what it finished). For a short GPU lease, the environment
# narrows the work: SMOKE_MODELS (default tiny,smolvlm-256m), ROLLOUTS (8,16), QWEN_QUANTIZE (none,nf4,int4),
# SMOLVLM_QUANTIZE (none,nf4; empty skips the SmolVLM rows), BUILD_MODELS (the folders built in the background).
set -u
TAR=${1:-}
BUDGET=${2:-480}
STAGES=,${3:-env,smoke,kernels,memory,sampling},
START=$(date +%s)
RESULTS=bench/results
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
MODELS=/tmp/ttrv-bench-models

stage() { echo; echo "=== $1 ($(($(date +%s) - START)) s into the run)"; }
wanted() { [[ $STAGES == *,$1,* ]]; }
pack() { [ -z "$TAR" ] || tar czf "$TAR" $RESULTS/*_cuda.* $RESULTS/memory_gpu.* 2>/dev/null || true; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

stage env
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 - <<'EOF'
import importlib.metadata as m
for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes", "optimum-quanto", "liger-kernel", "onnxruntime"):
    try:
        print(f"{dist} {m.version(dist)}")
    except m.PackageNotFoundError:
        print(f"{dist} absent")
EOF

python3 - >/tmp/build.log 2>&1 <<EOF &
import sys, torch
sys.path.insert(0, "bench")
from pathlib import Path
from real_size import build_model_dir, load_spec
for name in "${BUILD_MODELS:-qwen2-vl-2b smolvlm-256m smolvlm-500m}".split():
    build_model_dir(load_spec(name), Path("$MODELS") / f"{name}-bf16", dtype=torch.bfloat16)
    print("built", name, flush=True)
EOF
BUILD=$!

if wanted smoke; then
  stage smoke
  timeout -k 5 150 python3 bench/gpu_smoke.py --models "${SMOKE_MODELS:-tiny,smolvlm-256m}" \
    --out $RESULTS/gpu_smoke_cuda.csv
  echo "smoke exit $?"
  pack
fi
wait $BUILD; tail -3 /tmp/build.log

if wanted kernels; then
  stage kernels
  timeout -k 5 110 python3 bench/bench_logprob_entropy.py --N 2048,8192 --V 151936 --dtypes bf16 \
    --providers triton,torch,liger,compile --out $RESULTS/logprob_entropy_cuda.csv
  timeout -k 5 45 python3 bench/bench_linear_logprob_entropy.py --N 2048,8192 --V 151936 --H 1536 --dtypes bf16 \
    --providers triton,torch,chunked,liger --out $RESULTS/linear_logprob_entropy_cuda.csv
  timeout -k 5 45 python3 bench/bench_linear_grpo_loss.py --N 2048,8192 --V 151936 --H 1536 --dtypes bf16 \
    --providers fused,composition,trl,liger --out $RESULTS/linear_grpo_loss_cuda.csv
  pack
fi

MEMORY="python3 bench/bench_memory.py --device cuda --dtype bf16 --cache-dir $MODELS --rollouts ${ROLLOUTS:-8,16}
  --new-tokens 64 --memory-budget 6GB --timeout 120 --out $RESULTS/memory_gpu.csv"
RESERVE=$(wanted sampling && echo 60 || echo 0)
SMOLVLM_QUANTIZE=${SMOLVLM_QUANTIZE-none,nf4}
if wanted memory; then
  stage memory
  SHARE=$([ -n "$SMOLVLM_QUANTIZE" ] && echo 3 || echo 5)
  timeout -k 5 $((($(left) - RESERVE) * SHARE / 5)) $MEMORY --methods ttrv,trl --models qwen2-vl-2b \
    --quantize "${QWEN_QUANTIZE:-none,nf4,int4}"
  echo "memory (Qwen2-VL-2B) exit $?"
  pack
  if [ -n "$SMOLVLM_QUANTIZE" ] && [ $(($(left) - RESERVE)) -gt 30 ]; then
    timeout -k 5 $(($(left) - RESERVE - 15)) $MEMORY --methods ttrv,trl --models smolvlm-256m,smolvlm-500m \
      --quantize "$SMOLVLM_QUANTIZE"
    echo "memory (SmolVLM) exit $?"
    pack
  fi
fi
if wanted sampling && [ $(left) -gt 30 ]; then
  stage sampling
  timeout -k 5 $(($(left) - 15)) $MEMORY --methods sample-shared,sample-plain --models smolvlm-256m --quantize none
  echo "sampling exit $?"
fi

stage done
pack
[ -z "$TAR" ] || ls -la "$TAR"
