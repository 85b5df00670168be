"""What every replica does with the data it holds: per-rank batch indices of an epoch, contiguous
test-set slices, and inputs as float32 tensors. Pure numpy + torch; the same on every rank, so
ranks agree without talking."""
from __future__ import annotations

import numpy as np
import torch


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """Images as a float32 tensor: uint8 scaled to [0, 1], float32 shared without a copy."""
    if x.dtype == np.uint8:
        # one pass, one allocation; the result is bitwise what torch's x.float() / 255 gives
        return torch.from_numpy(np.divide(x, np.float32(255), dtype=np.float32))
    if x.dtype == np.float32 and x.flags.writeable:
        return torch.from_numpy(x)
    # read-only buffers (Ray's object store) cannot back a tensor torch may write to
    return torch.from_numpy(np.array(x, dtype=np.float32))


def shard_batches(n: int, world: int, rank: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's batches of one epoch, int64 [steps, batch_size] (DistributedSampler's cut)."""
    assert 0 <= rank < world and batch_size > 0, (rank, world, batch_size)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    steps = steps_per_epoch(n, world, batch_size)
    # perm[rank::world] has n // world or one more entries; truncating keeps every rank in step
    shard = perm[rank::world][: steps * batch_size]
    return shard.astype(np.int64, copy=False).reshape(steps, batch_size)


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Steps every rank takes per epoch (the ragged remainder is dropped)."""
    return (n // world) // batch_size


def eval_shard(n: int, world: int, rank: int) -> np.ndarray:
    """Contiguous near-equal slice of range(n) for this rank; the slices tile range(n)."""
    assert 0 <= rank < world, (rank, world)
    return np.arange(n * rank // world, n * (rank + 1) // world, dtype=np.int64)
