"""Worker for the DDP test: ``torchrun --nproc_per_node N tests/_ddp_trainer.py OUT CHUNK``.

Trains the digits prior for 3 steps (gloo, CPU) and has rank 0 save the prior's state to OUT.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_trainer import make  # noqa: E402


def main() -> None:
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
