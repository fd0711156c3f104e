"""The engine's data manager: per step, B training samples, decoded ahead of time.

Samples come in shuffled epochs over the training frames, as one stream. The frames are
grouped by timestep (their row of the audio features: the views of one moment from each
camera of a rig share it; a monocular clip has one per timestep), an epoch visits the
timesteps in a permutation drawn from the seed and the epoch, each timestep's views
together, in dataset order, and step s takes samples s*B .. s*B + B - 1 of the stream. So a
batch of as many samples as the rig has cameras is one moment seen from all of them. The
order is a pure function of (seed, B, step), so a resumed run sees what an uninterrupted
one would; and on a monocular clip sample n is frame perm_e[n mod N] of epoch e = n // N,
so B = 1 is the one-frame-per-step order of earlier versions.

Frames stream from disk through the dataset's LRU cache (recon/dataset.py). While a step
computes, a background thread can decode the next step's frames, so that decoding overlaps
compute instead of adding to it. It does so by default only where a core is free for it:
on a GPU run, or when the CPU has more cores than torch's compute threads. On a CPU run
using every core, the decoding thread slows the step more than it saves (measured with
`avatar bench train`: 0.84x the views per second on 2 cores), so frames are decoded in the
step there.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .dataset import Dataset
from .distributed import Ranks
from .method import Batch, Sample


class DataManager:
    """Batches of B samples from `train_ids` of `ds` (see the module docstring).

    Args:
        ds: the dataset, read on the run's device.
        train_ids: the frames to draw from.
        batch_size: B, samples per step.
        seed: seed of the shuffles.
        prefetch: decode the next step's frames in a background thread (None: where a core
            is free for it, see prefetch_helps).
        ranks: the processes sharing each step (`batch` gives this one's share).
    """

    def __init__(self, ds: Dataset, train_ids: list[int], batch_size: int, seed: int, prefetch: bool | None = None,
                 ranks: Ranks = Ranks()):
        if not train_ids:
            raise ValueError("no training frames to draw from")
        self.ds, self.train_ids, self.batch_size, self.seed = ds, list(train_ids), batch_size, seed
        self.ranks = ranks
        timesteps: dict[int, list[int]] = {}
        for i in self.train_ids:
            timesteps.setdefault(int(ds.frames[i]["frame_index"]), []).append(i)
        self.timesteps = list(timesteps.values())
        """The training frames by timestep, each timestep's views in dataset order."""
        if prefetch is None:
            prefetch = prefetch_helps(torch.device(ds.device))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._ahead: tuple[int, Future] | None = None  # (step, its frames being decoded)
        self._epoch: tuple[int, list[int]] | None = None  # (epoch, its frames in order)

    def index(self, n: int) -> int:
        """Dataset index of sample n of the stream."""
        epoch, k = divmod(n, len(self.train_ids))
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.timesteps), generator=g, device="cpu")  # host: an order
            self._epoch = (epoch, [i for t in perm.tolist() for i in self.timesteps[t]])
        return self._epoch[1][k]

    def samples(self, step: int) -> list[Sample]:
        """The B samples of `step`."""
        first = step * self.batch_size
        return [Sample(key=n, index=self.index(n)) for n in range(first, first + self.batch_size)]

    def batch(self, step: int) -> Batch:
        """This process's share of the samples of `step`, with their frames; starts
        decoding its share of step + 1's."""
        samples = self.ranks.share(self.samples(step))
        if self._ahead is not None and self._ahead[0] == step:
            for frame in self._ahead[1].result():  # a bad file raises here, in the step that needs it
                self.ds.keep(frame)
        self._ahead = None
        frames = [self.ds[s.index] for s in samples]
        if self._pool is not None:
            missing = list(dict.fromkeys(s.index for s in self.ranks.share(self.samples(step + 1))
                                         if not self.ds.cached(s.index)))
            if missing:
                self._ahead = (step + 1, self._pool.submit(lambda: [self.ds.read_frame(i) for i in missing]))
        return Batch(samples, frames, step_views=self.batch_size)

    def close(self) -> None:
        """Stop prefetching (a pending decode is finished and dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, None


def prefetch_helps(device: torch.device) -> bool:
    """Whether a decoding thread has a core of its own: on a GPU run, the host mostly waits;
    on a CPU run, only when there are more cores than torch's compute threads."""
    return device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
