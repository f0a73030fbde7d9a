#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU and PyTorch but perhaps no network:
#   1. the CUDA tests (tests/test_gpu.py, tests/test_decode.py; vLLM's and QLoRA's skip where those are absent),
#   2. the sampler's decode paths on a GPU-sized model (bench/decode.py: forward, native step, CUDA graph),
#   3. the benchmarks on the GPU: python -m bench.run --device cuda (bf16 mixed precision on both sides, MFU
#      against the bf16 matmul peak measured in the same run).
# Packages the machine lacks may be carried as wheels in .whl/ (bench/README.md says which); they go to /tmp/site.
# Logs and bench results go to $OUT (default /tmp/gpu-out). Time caps: TEST_S, DECODE_S, BENCH_S seconds; what
# runs: TESTS (pytest arguments), DECODE_ARGS (bench.decode's, "" skips it), BENCH_ARGS (bench.run's).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" || exit 1
timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gpu.py tests/test_decode.py} 2>&1 \
  | tee "$OUT/tests.log" | grep -v "^$" | tail -25
DECODE_ARGS=${DECODE_ARGS-"--size medium --tokens 32 128 --repeats 2"}
if [ -n "$DECODE_ARGS" ]; then
  for mixed in "" --mixed; do
    BENCH_DEVICE=cuda timeout "${DECODE_S:-120}" python3 -m bench.decode $DECODE_ARGS $mixed 2>&1 | tee -a "$OUT/decode.log" \
      | grep BENCH_RESULT | python3 -m bench.report
  done
fi
timeout "${BENCH_S:-300}" python3 -m bench.run --device cuda --keep-going --out "$OUT/results_cuda.json" \
  ${BENCH_ARGS:---only grpo sft logprobs --sizes medium small --pairs 1} 2>&1 | tee "$OUT/bench.log" \
  | python3 -m bench.report
ls -la "$OUT"
