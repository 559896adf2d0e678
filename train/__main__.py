"""`python -m cavmae.train ...` / `torchrun --nproc-per-node N -m cavmae.train ...`: the `cavmae-train` CLI."""

from cavmae.train.cli import run

run()
