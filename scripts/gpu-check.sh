#!/usr/bin/env bash
# The device check for a GPU box whose python has torch, timm and pytest but not this project's
# other packages (see README "GPU"): benchmarks/gpu.py --quick, then tests/test_gpu.py without
# conftest.py (which opens databases). Wheels in .whl/ (`make gpu-wheels`: pydantic and
# pydantic-settings) are installed into /tmp/site first. Logs go to $OUT when it is set.
#
#   bash scripts/gpu-check.sh [extra arguments for benchmarks/gpu.py]
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
	"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target /tmp/site .whl/*.whl || exit 1
	site=/tmp/site
fi
export PYTHONPATH=".:tests${site:+:$site}" PYTHONUNBUFFERED=1
logs=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$logs/gpu-check-smi.txt"
"$python" benchmarks/gpu.py --quick "$@" 2>&1 | tee "$logs/gpu-check-bench.txt"
bench=${PIPESTATUS[0]}
"$python" -m pytest --noconftest -p no:cacheprovider -ra -q tests/test_gpu.py 2>&1 \
	| tee "$logs/gpu-check-tests.txt"
tests=${PIPESTATUS[0]}
echo "benchmarks/gpu.py: exit $bench; tests/test_gpu.py: exit $tests"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
