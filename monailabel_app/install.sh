#!/usr/bin/env bash
# Install MONAI Label 0.8.5 without replacing torch (see docs/monailabel.md).
#
#   bash monailabel_app/install.sh [ENV_DIR]
#
# With ENV_DIR: a virtual environment layered on the current Python, a venv included (it sees torch, monai and
# this bundle; MONAI Label's packages stay out of the bundle's environment), then use ENV_DIR/bin/python. Without: into the current environment. Every package already installed keeps its
# version (pip fails rather than replace torch, numpy or monai); MONAI Label itself and pydicom-seg go in
# with --no-deps, their real runtime dependencies from requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# the versions of the environment the bundle runs in (the active one), before anything changes
"$python" -m pip freeze --exclude-editable | grep -v ' @ ' > "$constraints"
if [ $# -ge 1 ]; then
    # venv's --system-site-packages layers on the BASE interpreter, also when run from a venv; a venv's own
    # packages (torch, monai, this bundle) are layered on with a .pth file that adds its site-packages
    layers="$("$python" -c 'import site, sys; print("\n".join(d for d in site.getsitepackages() if sys.prefix != sys.base_prefix and d.startswith(sys.prefix)))')"
    "$python" -m venv --system-site-packages "$1"
    target="$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    : > "$target/_bundle_environment.pth"
    while IFS= read -r dir; do
        if [ -n "$dir" ]; then
            printf 'import site; site.addsitedir(%s)\n' "$("$python" -c 'import sys; print(repr(sys.argv[1]))' "$dir")" >> "$target/_bundle_environment.pth"
        fi
    done <<< "$layers"
    python="$1/bin/python"
fi
"$python" -m pip install -q -r "$here/requirements.txt" -c "$constraints"
# pip names what monailabel and pydicom-seg declare but do not get here (sam2, monai extras, numpy<2): expected
"$python" -m pip install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
"$python" - <<'PY'
import monai, torch
import monailabel.app  # the server's imports (FastAPI app, datastores, DICOM support)

print(f"MONAI Label {monailabel.__version__} with torch {torch.__version__} and monai {monai.__version__}")
PY
