"""The order of an epoch: which samples make up every global step, and which micro-batches each rank reads.

Everything here is a function of (seed, epoch, the sample index, the global batch) alone, never of the world size,
the loader worker count or what ran before, so a run stopped anywhere resumes exactly, even on another number
of GPUs:

- The epoch's order is a full permutation of the index (numpy PCG64 seeded from (seed, epoch)); when an epoch
  is longer than the index (`epoch_samples`), further permutations from the same generator follow it. With
  class-balanced sampling it is instead `samples` draws with replacement by weight (the official
  `WeightedRandomSampler`), from the same generator. The tail that does not fill a global batch is dropped
  (the official loader's `drop_last`): it is fewer than one global batch, and other epochs visit it.
- Global step s of the epoch is positions [s·B, (s+1)·B) of that order (B the global batch). Rank r of W takes
  its contiguous slice [r·B/W, (r+1)·B/W), cut into `accum_steps` micro-batches in order. So the samples of a
  step are the same on any W; only who reads them changes.
- Loader worker w of n reads this rank's micro-batches w, w+n, ...; torch's DataLoader yields the batches of
  an iterable dataset's workers round-robin, so the rank sees them in the same order whatever n is.
- Every random draw about a sample (frame choice, mixup partner and λ, augmentation parameters, noise seed)
  comes from a generator that is a function of (seed, epoch, its position in the epoch) (`SampleRngs`), and the
  model's own randomness (masking, dropout) from (seed, global step, rank, micro-batch) (`step_seed`): no RNG
  state to save or replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORDER, STEP = 1, 3  # first word of each seed: the two kinds of seeded generator never share a stream


def generator(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class SampleRngs:
    """The generators of the samples of one epoch: Philox (a counter-based generator) keyed by (seed, epoch), with
    the sample's position and a stream number in the high words of its counter. Seeding one is an assignment of
    its counter (~5 µs), where hashing a fresh seed per sample costs ~30-80 µs, a sixth of a sample's CPU work.

    `at(position, stream)` returns one shared generator: use it before the next call. Stream 0 draws the mixup
    partner, stream 1 everything `Transform.example` draws, so both are functions of the position alone."""

    def __init__(self, seed: int, epoch: int):
        self.bits = np.random.Philox(key=[seed % 2 ** 64, epoch])
        self.fresh = self.bits.state
        self.rng = np.random.Generator(self.bits)

    def at(self, position: int, stream: int) -> np.random.Generator:
        state = self.fresh
        state["state"]["counter"] = np.array([0, 0, position, stream], dtype=np.uint64)
        self.bits.state = state
        return self.rng


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A torch seed for the model's randomness in micro-batch `micro` of global step `step` on `rank`."""
    return int(np.random.SeedSequence([STEP, seed, step, rank, micro]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch of `size` indexed samples is cut into global steps and micro-batches (see the module doc).

    `samples` is the epoch length before the tail is dropped (the index size unless `epoch_samples` is set);
    `weights` (one per indexed sample) switches to draws with replacement."""

    size: int
    samples: int
    global_batch: int
    accum_steps: int
    world_size: int
    rank: int
    seed: int
    weights: np.ndarray | None = None

    def __post_init__(self):
        parts = self.world_size * self.accum_steps
        if self.global_batch % parts:
            raise ValueError(f"batch_size {self.global_batch} is not divisible by world size x accum_steps "
                             f"= {parts}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return self.samples // self.global_batch

    @property
    def micro(self) -> int:
        """Samples per micro-batch on one rank."""
        return self.global_batch // (self.world_size * self.accum_steps)

    @property
    def batches(self) -> int:
        """Micro-batches per epoch on one rank."""
        return self.steps * self.accum_steps

    def order(self, epoch: int) -> np.ndarray:
        """The index of the sample at every position of `epoch` (0-based), tail dropped."""
        n = self.steps * self.global_batch
        rng = generator(ORDER, self.seed, epoch)
        if self.weights is not None:
            return rng.choice(self.size, size=n, replace=True, p=self.weights / self.weights.sum())
        rounds = -(-n // self.size)
        return np.concatenate([rng.permutation(self.size) for _ in range(rounds)])[:n]

    def positions(self, first: int, count: int) -> np.ndarray:
        """[count, micro] epoch positions of this rank's micro-batches first .. first+count-1."""
        b = np.arange(first, first + count)
        start = (b // self.accum_steps) * self.global_batch + self.rank * (self.global_batch // self.world_size) \
            + (b % self.accum_steps) * self.micro
        return start[:, None] + np.arange(self.micro)[None, :]
