#!/usr/bin/env bash
# A virtual environment with another triton, for the ahead-of-time compile check under the triton the
# GPU machine runs (3.6.0) rather than the one CI installs:
#
#     bash tools/make_triton_venv.sh                 # triton 3.6.0 in /tmp/venv-triton-3.6.0
#     bash tools/make_triton_venv.sh 3.6.0 DIR
#     DIR/bin/python tools/triton_compile_check.py --full --csv benchmarks/results/triton_compile_check_triton-3.6.0.csv
#
# The venv sees the calling interpreter's packages (--system-site-packages), so torch and numpy are
# not downloaded again; its own site-packages, which comes first on sys.path, holds only triton.
# The check imports the kernel modules, which import torch, but it runs no torch code.
set -euo pipefail
VERSION="${1:-3.6.0}"
DIR="${2:-${TMPDIR:-/tmp}/venv-triton-$VERSION}"
PY="${PYTHON:-python3}"

if [ ! -x "$DIR/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$DIR"
fi
"$DIR/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "triton==$VERSION"
GOT=$("$DIR/bin/python" -c "import triton; print(triton.__version__)")
if [ "$GOT" != "$VERSION" ]; then
  echo "make_triton_venv: $DIR imports triton $GOT, not $VERSION" >&2
  exit 1
fi
echo "$DIR/bin/python (triton $GOT)"
