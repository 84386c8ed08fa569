"""MaskSet collectives on two gloo processes: broadcast makes ranks agree, the check catches disagreement."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_lightning.core.masks import MaskSet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        module = torch.nn.Linear(16, 8)
        mask_set = MaskSet.of(module)
        mask_set.add("weight", module.weight, torch.rand(8, 16) > 0.5)
        try:
            mask_set.check_agreement()
            caught = ""
        except RuntimeError as err:
            caught = str(err)
        mask_set.broadcast()
        mask_set.check_agreement()
        torch.save({"caught": caught, "mask": mask_set["weight"].clone()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_broadcast_and_agreement_check(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert "Masks differ between rank 0 and rank 1 for ['weight']" in r0["caught"]
    assert torch.equal(r0["mask"], r1["mask"])
