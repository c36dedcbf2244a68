#!/usr/bin/env bash
# A virtual environment with another triton, for the ahead-of-time compile check under the triton the
# GPU machine runs (3.6.0) rather than the one CI installs:
#
#     bash tools/make_triton_venv.sh                 # triton 3.6.0 in /tmp/venv-triton-3.6.0
#     bash tools/make_triton_venv.sh 3.6.0 DIR
#     TRITON_INTERPRET=0 DIR/bin/python tools/triton_compile_check.py \
#         --csv benchmarks/results/triton_compile_check_triton-3.6.0.csv \
#         --table benchmarks/results/triton_compile_check_triton-3.6.0.txt
#
# The venv sees the calling interpreter's packages (a .pth file naming its site-packages, which Python
# appends after the venv's own), so torch and numpy are not downloaded again; the venv's site-packages
# holds only triton and comes first. The check imports the kernel modules, which import torch, but
# runs no torch code.
set -euo pipefail
VERSION="${1:-3.6.0}"
DIR="${2:-${TMPDIR:-/tmp}/venv-triton-$VERSION}"
PY="${PYTHON:-python3}"

if [ ! -x "$DIR/bin/python" ]; then
  "$PY" -m venv "$DIR"
fi
BASE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
OWN=$("$DIR/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$BASE" > "$OWN/_calling_env.pth"
"$DIR/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "triton==$VERSION"
GOT=$("$DIR/bin/python" -c "import torch, triton; print(triton.__version__)")
if [ "$GOT" != "$VERSION" ]; then
  echo "make_triton_venv: $DIR imports triton $GOT, not $VERSION" >&2
  exit 1
fi
echo "$DIR/bin/python (triton $GOT)"
