#!/usr/bin/env bash
# The GPU checks of issue 14 in one call on a lent GPU machine (no internet, its own python3 with
# torch and CUDA): the CUDA tests, the speed benchmark and DiEM at full data, each in a time box,
# results under $OUT (or ./gpu-out). Prepare here first: ../shared/tools/gpu-wheels.sh (wheels into
# .whl/) and a cache with the Frechet feature network (CLEANPRIOR_CACHE=.cache-gpu python3 -c
# "from cleanprior.metrics.frechet import feature_network; feature_network('mnist5k')"), then carry
# .whl and .cache-gpu along.
#
# Usage: benchmarks/gpu.sh [tests] [speed] [em]     (all three when none is named)
# Time boxes (seconds): TESTS_S=180 SPEED_S=240 EM_S=600.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 CLEANPRIOR_CACHE=${CLEANPRIOR_CACHE:-$PWD/.cache-gpu}
stages=${*:-tests speed em}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$out/gpu.txt" 2>&1
for stage in $stages; do
  case $stage in
    tests) timeout "${TESTS_S:-180}" python3 -m pytest -q -p no:cacheprovider -k cuda tests > "$out/tests.txt" 2>&1 ;;
    speed) timeout "${SPEED_S:-240}" python3 benchmarks/bench_speed.py --device cuda --output "$out/RESULTS_SPEED.md" \
             > "$out/speed.txt" 2>&1 ;;
    em) timeout "${EM_S:-600}" python3 benchmarks/bench_em.py mnist-full --device cuda --seeds 0 \
          --workdir "$out/em" --output "$out/RESULTS_EM.md" > "$out/em.txt" 2>&1 ;;
    *) echo "unknown stage $stage (tests, speed, em)"; exit 2 ;;
  esac
  echo "$stage: exit $?"
  tail -n 3 "$out/$stage.txt"
done
