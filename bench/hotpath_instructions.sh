#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind (deterministic: the same
# figure on a busy or a quiet machine, unlike timings). Runs bench/hotpath_micro.py twice, with
# 2,000 and 12,000 requests, and divides the difference by 10,000, so start-up drops out.
#
#   bench/hotpath_instructions.sh              # the plain proxy path (request metrics on)
#   bench/hotpath_instructions.sh --policies   # with key_auth and a memory rate_limit
#
# Needs valgrind (apt-get install valgrind); takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"  # the project's environment (uv sync), run directly:
                                      # valgrind would otherwise count uv itself
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$python" bench/hotpath_micro.py -n "$1" --rounds 1 "${@:2}" 2>&1 \
        | grep -o "Collected : [0-9]*" | grep -o "[0-9]*" | tail -1
}
a=$(count 2000 "$@")
b=$(count 12000 "$@")
echo "instructions per request: $(( (b - a) / 10000 ))  ($*)"
