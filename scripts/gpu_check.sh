#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine that has torch, pytorch-lightning, torchmetrics,
# PyYAML and numpy but no omegaconf and no package index: omegaconf comes from .gpu_wheels/
# (built here by scripts/gpu_wheels.sh and carried along), installed only if `import omegaconf`
# fails. Writes $OUT/gpu_check.json and $OUT/gpu_check.log (OUT defaults to benchmarks/results);
# arguments go on to gpu_check.py (e.g. --smoke, --budget-s 300). Exit code: gpu_check.py's
# (0 all checks passed, 1 a check failed), 3 when omegaconf cannot be had.
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT_DIR=${OUT:-benchmarks/results}
WHEELS=.gpu_wheels
SITE=$WHEELS/site  # the fall-back install target (inside the ignored folder)
mkdir -p "$OUT_DIR"

if ! "$PY" -c "import omegaconf" 2>/dev/null; then
  if [ -n "$(ls "$WHEELS"/omegaconf-*.whl 2>/dev/null)" ]; then
    echo "[gpu_check.sh] no omegaconf: installing it from $WHEELS"
    if ! "$PY" -m pip install --no-index --find-links "$WHEELS" omegaconf; then
      # no pip, or an externally managed Python: the wheels are pure Python, unpack them
      echo "[gpu_check.sh] pip install failed: unpacking the pure-Python wheels into $SITE"
      "$PY" - "$WHEELS" "$SITE" <<'PYEOF'
import pathlib
import sys
import zipfile

src, dst = (pathlib.Path(p) for p in sys.argv[1:])
dst.mkdir(parents=True, exist_ok=True)
for wheel in sorted(src.glob("*-none-any.whl")):
    zipfile.ZipFile(wheel).extractall(dst)
    print("  unpacked", wheel.name)
PYEOF
      export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
  else
    echo "[gpu_check.sh] no omegaconf and no $WHEELS/omegaconf-*.whl: run" \
      "'bash scripts/gpu_wheels.sh' where the package index is reachable, and carry $WHEELS" >&2
  fi
  if ! "$PY" -c "import omegaconf; print('[gpu_check.sh] omegaconf', omegaconf.__version__)"; then
    echo "[gpu_check.sh] omegaconf is still not importable" >&2
    exit 3
  fi
fi

"$PY" benchmarks/gpu_check.py --require-cuda --out "$OUT_DIR/gpu_check.json" "$@" 2>&1 |
  tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
