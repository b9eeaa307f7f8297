"""Put this bundle where MONAI Label's stock ``monaibundle`` app finds local bundles (see docs/monailabel.md).

    python monailabel_app/stock_bundle.py APP_DIR/model/brain_tumour_segmentation [--model CKPT] [--overrides JSON]

then ``--conf models brain_tumour_segmentation --conf zoo_source local`` when starting the server.
"""

from __future__ import annotations

import argparse
import json
import sys

from bundle.configs import TUMOUR_CONFIGS
from lib.bundle_config import REPO_ROOT, read_config
from lib.stock_bundle import export_stock_bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", help="bundle folder to write, e.g. <monaibundle app>/model/brain_tumour_segmentation")
    parser.add_argument("--bundle-root", default=str(REPO_ROOT), help="this bundle (default: this repository)")
    parser.add_argument("--model", default=None, help="checkpoint to ship (default: the shipped tumour model, "
                        "configs/tumour.json's ckpt_path)")
    parser.add_argument("--overrides", default="{}", help='config ids to set, JSON, e.g. \'{"pixdim": [4, 4, 4]}\'')
    args = parser.parse_args(argv)
    overrides = json.loads(args.overrides)
    if not isinstance(overrides, dict):
        parser.error(f"--overrides must be a JSON object, got {args.overrides!r}")
    model = args.model or read_config(args.bundle_root, TUMOUR_CONFIGS, overrides).get_parsed_content("ckpt_path")
    dest = export_stock_bundle(args.bundle_root, args.dest, model, overrides)
    print(f"wrote {dest} (configs/inference.json, metadata.json, train.json, logging.conf; models/model.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
