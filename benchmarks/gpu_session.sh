#!/usr/bin/env bash
# The device machine's command (README "GPU"): install the bundle's wheels beside the image's packages, then
# run the session. `bash benchmarks/gpu_session.sh --cpu` is its rehearsal (tests/test_gpu_bundle.py).
set -euo pipefail
cd "$(dirname "$0")/.."
site=${GPU_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_session.py "$@"
