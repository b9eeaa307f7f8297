#!/usr/bin/env bash
# Install MONAI Label 0.8.5 without replacing torch (see docs/monailabel.md).
#
#   bash monailabel_app/install.sh [ENV_DIR]
#
# With ENV_DIR: a virtual environment layered on the current Python (--system-site-packages: it sees torch,
# monai and this bundle; MONAI Label's packages stay out of the bundle's environment), then use
# ENV_DIR/bin/python. Without: into the current environment. Every package already installed keeps its
# version (pip fails rather than replace torch, numpy or monai); MONAI Label itself and pydicom-seg go in
# with --no-deps, their real runtime dependencies from requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if [ $# -ge 1 ]; then
    "$python" -m venv --system-site-packages "$1"
    python="$1/bin/python"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$python" -m pip freeze --exclude-editable | grep -v ' @ ' > "$constraints"
"$python" -m pip install -q -r "$here/requirements.txt" -c "$constraints"
# pip names what monailabel and pydicom-seg declare but do not get here (sam2, monai extras, numpy<2): expected
"$python" -m pip install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
"$python" - <<'PY'
import monai, torch
import monailabel.app  # the server's imports (FastAPI app, datastores, DICOM support)

print(f"MONAI Label {monailabel.__version__} with torch {torch.__version__} and monai {monai.__version__}")
PY
