"""Global batches that do not depend on the number of ranks.

Each epoch shuffles the whole training set with one seed (the same on every
rank), cuts it into global batches of ``train_batch_size`` rows, and rank r
takes the r-th slice of each, split into gradient-accumulation micro-batches.
So 1 process with accumulation and N ranks see the same global batches, and
their runs can be compared.
"""
import torch


class GlobalBatchSampler(torch.utils.data.Sampler):
    def __init__(self, num_rows: int, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, seed: int = 42):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"train_batch_size {global_batch} is not a multiple of "
                             f"micro batch {micro_batch} x {world_size} ranks")
        if num_rows < global_batch:
            raise ValueError(f"{num_rows} training rows are fewer than one global batch of "
                             f"{global_batch}; lower train_batch_size or use more data")
        self.num_rows, self.global_batch, self.micro_batch = num_rows, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.skip = 0  # micro-batches to skip when resuming mid-epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    @property
    def micro_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def set_epoch(self, epoch: int, skip_steps: int = 0):
        self.epoch, self.skip = epoch, skip_steps * self.micro_per_step

    def __len__(self):
        return self.steps_per_epoch * self.micro_per_step - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=g).tolist()
        share = self.global_batch // self.world_size
        batches = []
        for b in range(self.steps_per_epoch):
            rows = order[b * self.global_batch:(b + 1) * self.global_batch]
            mine = rows[self.rank * share:(self.rank + 1) * share]
            batches += [mine[i:i + self.micro_batch] for i in range(0, share, self.micro_batch)]
        return iter(batches[self.skip:])
