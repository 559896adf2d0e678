"""`pipeline.yaml`, generated from the settings of all three owners: `shards/settings.py` (audio, video, clip,
shards), `preprocess/settings.py` (ray) and `train/settings.py` (model, data, pretrain, finetune, eval, presets).
It lives here because only `cavmae` may import both `preprocess` and `train`.

    python -m cavmae.settings            # print it
    python -m cavmae.settings --write    # rewrite pipeline.yaml (tests/test_config.py checks it is current)
"""

from __future__ import annotations

import argparse
import sys

import cavmae.preprocess.settings  # noqa: F401  (registers ray)
import cavmae.train.settings  # noqa: F401  (registers the training sections and presets)
from cavmae.shards.settings import PIPELINE_YAML, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cavmae.settings",
                                     description="print pipeline.yaml, generated from every owner's settings.py")
    parser.add_argument("--write", action="store_true", help=f"write it to {PIPELINE_YAML.name} instead")
    args = parser.parse_args(argv)
    if args.write:
        PIPELINE_YAML.write_text(render())
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
