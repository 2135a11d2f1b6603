"""Worker for the DDP tests: ``torchrun --nproc_per_node N tests/_ddp_trainer.py OUT CHUNK V...``.

Trains the digits model for 3 steps in each variant ``V`` of ``test_trainer.VARIANTS`` (gloo,
CPU) and has rank 0 save, per variant, every trained tensor (energy, backbone groups, persistent
chains) and the history to OUT. The data is a tensor, except for the variant ``joint``: there it
is a ``test_trainer.Counting`` dataset, and every rank saves the indices it fetched to
``OUT.fetched-RANK``. With CHUNK ``release`` it instead runs 200 of the trainer's collectives and
has rank 0 save, for each, whether the tensors' reference counts were back to their value before
the collective when it returned (that is, gloo's worker threads no longer held them), and whether
20 plain collectives followed by ``barrier`` and ``destroy_process_group`` had let go of theirs.

The script's folder is on the module path when it runs, and ``ebm_prior`` is installed.
"""

import os
import sys

import torch
import torch.distributed as dist
from test_trainer import Counting, data, make, trained


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
    # plain collectives, then the end of a script: barrier and destroy_process_group, which
    # joins gloo's worker threads, so every tensor is let go of when it returns
    tensors = [torch.ones(1000) for _ in range(20)]
    before = [sys.getrefcount(t) for t in tensors]
    for work in [dist.all_reduce(t, async_op=True) for t in tensors]:
        work.wait()
    del work
    dist.barrier()
    dist.destroy_process_group()
    after = [sys.getrefcount(t) for t in tensors]
    if int(os.environ["RANK"]) == 0:
        torch.save({"released": released, "released_by_destroy": after == before}, out)


def main() -> None:
    if sys.argv[2] == "release":
        return release(sys.argv[1])
    out, chunk, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    results = {}
    for variant in variants:
        x = Counting(data()) if variant == "joint" else None
        trainer = make(variant, chunk_size=chunk, progress=False, x=x)
        trainer.fit(3)
        results[variant] = {"trained": trained(trainer), "history": trainer.history}
        if x is not None:
            torch.save(x.fetched, f"{out}.fetched-{trainer.rank}")
    if not distributed or dist.get_rank() == 0:
        torch.save(results, out)
    if distributed:  # how a script should end (see the trainer's design decisions)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
