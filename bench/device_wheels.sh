#!/usr/bin/env bash
# The wheels `bench/gpu.py --backend jax` needs on a GPU machine that has JAX, numpy and the usual scientific stack
# but neither TensorFlow nor a package index (the device tool's machine), at this project's pinned versions, into
# .whl/ (git-ignored; about 6 MB). There, with .whl carried along:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. python3 bench/gpu.py
#
# PYTHON_VERSION (default 3.12) is that machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=()
for package in keras namex optree pydantic pydantic_core annotated-types typing-inspection; do
  pins+=("$(grep -i "^${package}==" constraints.txt)")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --dest .whl "${pins[@]}"
ls .whl
