"""`pipeline.yaml`, generated from the settings of all three owners: `shards/settings.py` (audio, video, clip,
shards), `preprocess/settings.py` (ray) and `train/settings.py` (model, data, pretrain, finetune, eval, presets);
and `register_sections`, every owner's at once, for the entries that use both stages (`cavmae`, this one, the tests).
It lives here because only `cavmae` may import both `preprocess` and `train`.

    python -m cavmae.settings            # print it
    python -m cavmae.settings --write    # rewrite pipeline.yaml (tests/test_config.py checks it is current)
"""

from __future__ import annotations

import argparse
import sys

from cavmae.preprocess import settings as preprocess_settings
from cavmae.shards.settings import PIPELINE_YAML, render
from cavmae.train import settings as train_settings


def register_sections() -> None:
    """Register every owner's sections (shards' own are registered already): all that pipeline.yaml holds."""
    preprocess_settings.register_sections()
    train_settings.register_sections()


def main(argv: list[str] | None = None) -> int:
    register_sections()
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
