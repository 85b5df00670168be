"""Sandblaster on a streamed dataset (docs/data.md, README.md beside this file): an L-BFGS
iteration's batch is read by Ray Data into blocks that stay in the object store, and each work unit
is a row range of that batch given as pieces of blocks. The coordinator never fetches the rows; a
replica fetches the blocks of the units it is handed and keeps them, as tensors, for the
iteration's line search (up to 25 evaluations of one batch).

The batch: the whole training split in its stored order (read once for the run), or, with
``sandblaster.lbfgs_batch``, the first ``lbfgs_batch`` rows of the split in the iteration's seeded
block order (``StreamData.epoch_plan`` with the iteration as the epoch): a sample of whole blocks,
not of single rows."""
from __future__ import annotations

import numpy as np

Piece = tuple  # (block ObjectRef, first row, end row) within that block


class StreamBatch:
    """The coordinator's side: the iteration's batch as blocks, cut into units' pieces."""

    def __init__(self, data, seed: int) -> None:
        self.data, self.seed = data, seed
        self.key, self.blocks, self.rows = None, [], 0

    def read(self, key: int, lbfgs_batch: int | None) -> int:
        """Read batch ``key`` (-1: the whole training split) unless it is the one held; its rows."""
        import warnings

        from ray_train.data.streams import quiet_context

        if key == self.key:
            return self.rows
        quiet_context()
        ds = self.data.splits["train"] if key < 0 else self.data.epoch_plan(self.seed, key).limit(lbfgs_batch)
        with warnings.catch_warnings():  # Ray Data's copy of its context warns of its own deprecated fields
            warnings.simplefilter("ignore", DeprecationWarning)
            held = ds.materialize()  # blocks in the object store; the driver holds their refs only
            self.blocks = []
            for bundle in held.iter_internal_ref_bundles():
                for entry, part in zip(bundle.blocks, bundle.slices):
                    ref, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
                    lo, hi = (part.start_offset, part.end_offset) if part is not None else (0, meta.num_rows)
                    if hi > lo:
                        self.blocks.append((ref, lo, hi))
        self.held, self.key = held, key
        self.rows = sum(hi - lo for _, lo, hi in self.blocks)
        return self.rows

    def pieces(self, lo: int, hi: int) -> list[Piece]:
        """Rows [lo, hi) of the batch as pieces of its blocks."""
        out, start = [], 0
        for ref, a, b in self.blocks:
            end = start + (b - a)
            if end > lo and start < hi:
                out.append((ref, a + max(lo - start, 0), a + min(hi, end) - start))
            start = end
        return out


def read_unit(data, pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """A unit's (float32 inputs, int64 labels), fetched from its blocks (a replica's side)."""
    import ray
    from ray.data.block import BlockAccessor

    from ray_train.worker.stream import prepared

    xs, ys = [], []
    for ref, a, b in pieces:
        batch = BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy")
        x, y = prepared(data, {k: v[a:b] for k, v in batch.items()})
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)
