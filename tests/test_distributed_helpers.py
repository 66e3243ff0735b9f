"""The multi-process helper itself: results come back by rank, a failing rank's traceback surfaces."""

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import run_distributed


def _all_reduce_rank() -> dict:
    dist.init_process_group("gloo")
    try:
        total = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(total)
        return {"rank": dist.get_rank(), "sum": total, "cuda_visible": torch.cuda.is_available()}
    finally:
        dist.destroy_process_group()


def _fail_on_rank_one() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # rank 0 waits here until the helper stops it


def test_results_come_back_in_rank_order():
    results = run_distributed(_all_reduce_rank, 2)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"].item() == 1.0 and not r["cuda_visible"] for r in results)


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(ChildProcessError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout_s=60)
    message = str(info.value)
    assert "--- rank 1 ---" in message and "ValueError: planted failure on rank 1" in message
    assert "_fail_on_rank_one" in message
