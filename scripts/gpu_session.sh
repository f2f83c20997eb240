#!/usr/bin/env bash
# Issue 15's GPU checks in one command for a lent GPU machine (docs/devices.md, "On a GPU").
#
# Here, once per checkout (downloads the packages the GPU image lacks, for its Python 3.12,
# into .whl/, which git ignores; the versions are the ones this checkout's venv holds):
#     . .venv/bin/activate && bash scripts/gpu_session.sh --fetch-wheels
# Then, with the device tool (about 9 minutes of device time):
#     run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=580)
# It runs the CUDA tests of tests/test_devices.py (every device-dependent example against the
# CPU, a GPU run resumed on the CPU) and benchmarks/gpu.py, and leaves their logs and the
# benchmark's JSON in $OUT. Put the numbers in docs/benchmarks.md.
set -u
PACKAGES="pydantic pydantic-core annotated-types typing-inspection mlxtend cryptography cffi pycparser opacus"

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  pins=$(python - "$PACKAGES" <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1].split()))
EOF
)
  rm -rf .whl && mkdir -p .whl
  # shellcheck disable=SC2086
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl $pins
  ls .whl
  exit
fi

OUT=${OUT:-/tmp/gossamer-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels: run scripts/gpu_session.sh --fetch-wheels here first, and carry .whl"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
set -o pipefail
timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_devices.py -k "cuda or gpu or environment or bf16" \
  2>&1 | tee "$OUT/tests.log"
timeout 330 python3 benchmarks/gpu.py --rounds 2 --cpu-rounds 1 --clients 100,1000 --dpsgd-nodes 10000 \
  --timeout 150 --json 2>&1 | tee "$OUT/benchmark.log"
tail -n 1 "$OUT/benchmark.log" > "$OUT/benchmark.json"
