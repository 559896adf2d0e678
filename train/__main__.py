"""`python -m train ...` / `torchrun --nproc-per-node N -m train ...`: the `cavmae-train` CLI."""

from train.cli import run

run()
