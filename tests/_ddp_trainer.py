"""Worker for the DDP tests: ``torchrun --nproc_per_node N tests/_ddp_trainer.py OUT CHUNK``.

Trains the digits prior for 3 steps (gloo, CPU) and has rank 0 save the prior's state to OUT.
With CHUNK ``release`` it instead runs 200 of the trainer's collectives and has rank 0 save,
for each, whether the tensors' reference counts were back to their value before the collective
when it returned (that is, gloo's worker threads no longer held them).
"""

import os
import sys

import torch
import torch.distributed as dist
from test_trainer import make  # the script's own folder is on the path


def release(out: str) -> None:
    from ebm_prior.trainer import _collective

    dist.init_process_group("gloo")
    released = []
    for i in range(200):
        a, b = torch.full((1000,), float(i)), torch.ones(3)
        before = sys.getrefcount(a), sys.getrefcount(b)
        _collective([a, b], dist.all_reduce)
        released.append((sys.getrefcount(a), sys.getrefcount(b)) == before)
        assert a[0].item() == 2 * i and b.sum().item() == 6
    if dist.get_rank() == 0:
        torch.save({"released": released}, out)
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[2] == "release":
        return release(sys.argv[1])
    out, chunk = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    trainer = make(chunk_size=chunk, progress=False)
    trainer.fit(3)
    if trainer.rank == 0:
        torch.save({"prior": trainer.prior.state_dict(), "history": trainer.history}, out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
