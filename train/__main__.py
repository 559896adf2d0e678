"""`python -m train ...` / `torchrun --nproc-per-node N -m train ...`: the `cavmae-train` CLI."""

import sys

from train.cli import main

sys.exit(main())
