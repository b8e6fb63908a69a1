"""Data-parallel fit: two gloo ranks on CPU end with identical weights, one rank = plain fit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from conftest import toy_category, toy_val  # noqa: E402

from automl_ad.training.distributed import DataParallel  # noqa: E402
from automl_ad.training.loop import TrainConfig, fit  # noqa: E402

CFG = dict(method="draem", method_params={"rec_width": 4, "disc_width": 4}, image_size=32, epochs=2,
           steps_per_epoch=2, batch_size=2, seed=5)


def _rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        data = toy_category()
        result = fit(TrainConfig(**CFG), data, toy_val(data), evaluate_test=False, data_parallel=DataParallel(),
                     checkpoint_dir=Path(out) / f"ckpt{rank}")
        torch.save({"state": result.method.state_dict(), "losses": [r.train_loss for r in result.reports],
                    "val": result.reports[-1].val}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_average_gradients_and_stay_identical(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key, value in rank0["state"].items():
        if value.is_floating_point() and "running" not in key:  # BN statistics are per rank
            assert torch.equal(value, rank1["state"][key]), key
    assert rank0["losses"] != rank1["losses"], "each rank must draw its own batches"
    assert rank0["val"] and not rank1["val"], "only rank 0 validates"
    assert (tmp_path / "ckpt0" / "checkpoint.pt").exists() and not (tmp_path / "ckpt1").exists()


def test_one_rank_trains_exactly_like_plain_fit(tmp_path):
    mp.spawn(_rank_main, args=(1, _free_port(), str(tmp_path)), nprocs=1, join=True)
    data = toy_category()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the rank process: thread count changes float sums
    try:
        plain = fit(TrainConfig(**CFG), data, toy_val(data), evaluate_test=False)
    finally:
        torch.set_num_threads(threads)
    single = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert single["losses"] == [r.train_loss for r in plain.reports]
    for key, value in plain.method.state_dict().items():
        assert torch.equal(value, single["state"][key]), key
