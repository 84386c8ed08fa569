"""Rank agreement on two gloo processes: equal fingerprints pass, one differing entry is named with its ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_lightning.core.masks import MaskSet, check_ranks_agree, fingerprint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = torch.nn.Linear(16, 8)
        mask_set = MaskSet.of(module)
        same = torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) > 0.5
        mask_set.add("weight", module.weight, same)
        mask_set.add("bias", module.bias, torch.rand(8, generator=torch.Generator().manual_seed(rank)) > 0.5)
        check_ranks_agree(mask_set.fingerprints(["weight"]), "masks", "Test")  # equal: no error
        try:
            check_ranks_agree(mask_set.fingerprints(), "masks", "Test at step 3")
            caught = ""
        except RuntimeError as err:
            caught = str(err)
        torch.save({"caught": caught}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_rank_that_differs_is_named_on_every_rank(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        caught = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["caught"]
        assert "Test at step 3: the ranks computed different masks (rank 0 and rank 1 differ in bias)" in caught


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.bool])
def test_fingerprint_tells_bitwise_differences(dtype):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(fingerprint(t), fingerprint(t.clone()))
    changed = t.clone()
    changed[500] = ~changed[500] if dtype == torch.bool else -changed[500]
    assert not torch.equal(fingerprint(t), fingerprint(changed))
    if dtype != torch.bool:
        zeros, negative_zeros = torch.zeros(3, dtype=dtype), -torch.zeros(3, dtype=dtype)
        assert not torch.equal(fingerprint(zeros), fingerprint(negative_zeros))
