#!/usr/bin/env bash
# Wheels the GPU machine lacks (it reaches no package index), downloaded here into .whl/ for `carry`:
# transformers 5.23 (the peer and parity oracle), the serving stack (dsv4 serve, bench/serve.py) and pytest-xdist
# (pyproject's pytest addopts ask for it; the GPU tests run with -n 0, one process on the one GPU).
# bench/gpu_session.sh installs whatever lies in .whl/ into /tmp/site before it runs anything.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.23.0 fastapi starlette pydantic pydantic-core uvicorn openai annotated-types \
  typing-inspection annotated-doc jiter distro sniffio prometheus-client opentelemetry-api importlib-metadata zipp httpx2 httpcore2 truststore \
  pytest-xdist execnet
ls .whl
