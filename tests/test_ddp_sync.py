"""Pruning under DDP: every rank removes the channels rank 0 chose, and the DDP wrapper is rebuilt around them.

Two CPU processes with a gloo process group stand in for nnU-Net's multi-GPU run (which uses NCCL; the
synchronisation code is backend-agnostic: broadcast_object_list + a new DistributedDataParallel wrapper).
Each rank proposes a DIFFERENT set of channels to keep, as it would from its own batches' importance scores.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_compress.network import CompressedUNet
from nnunet_compress.nnunet.pruning_trainer import PruningTrainerMixin

BASE_KWARGS = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 3,
                   strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2],
                   n_conv_per_stage_decoder=[2, 2], conv_bias=True, norm_op=nn.InstanceNorm3d,
                   norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                   nonlin_kwargs={"inplace": True}, deep_supervision=True)


class MiniTrainer(PruningTrainerMixin):
    """Just what the mixin reads from nnU-Net's trainer."""

    method = "taylor"

    def __init__(self, rank: int):
        torch.manual_seed(0)  # same initial weights on every rank, as DDP's broadcast would make them
        net = CompressedUNet(1, 3, "dynamic_network_architectures.architectures.unet.PlainConvUNet", **BASE_KWARGS)
        self.device, self.local_rank, self.is_ddp = torch.device("cpu"), rank, True
        self.network = DDP(net)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def _do_i_compile(self) -> bool:
        return False

    def configure_optimizers(self):
        return torch.optim.SGD(self.network.parameters(), lr=0.01, momentum=0.9), None


def train_step(trainer: MiniTrainer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 8, 8, 8, generator=g)
    trainer.optimizer.zero_grad()
    # deep supervision on, as nnU-Net trains: every head is used, so DDP's reducer sees every gradient
    sum(out.square().mean() for out in trainer.network(x)).backward()
    trainer.optimizer.step()


def _worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        trainer = MiniTrainer(rank)
        train_step(trainer, seed=rank)  # different batches per rank: momentum buffers exist, gradients averaged
        group = trainer.prunable_groups()[0]
        # each rank proposes other channels, as its own importance scores would
        proposal = {group.name: [0, 1] if rank == 0 else [2, 3]}
        trainer.apply_pruning(proposal)
        assert isinstance(trainer.network, DDP), "the DDP wrapper was not rebuilt"
        train_step(trainer, seed=10 + rank)  # DDP all-reduces over the new, smaller parameters
        state = {k: v.detach().clone() for k, v in trainer.plain_network.state_dict().items()}
        gathered = [None, None]
        dist.all_gather_object(gathered, state)
        if rank == 0:
            results.put({"shapes_equal": all(gathered[0][k].shape == gathered[1][k].shape for k in gathered[0]),
                         "weights_equal": all(torch.equal(gathered[0][k], gathered[1][k]) for k in gathered[0]),
                         "diff": [k for k in gathered[0] if not torch.equal(gathered[0][k], gathered[1][k])][:5],
                         "kept": group.name, "size": trainer.plain_network.get_submodule(group.producers[0])
                         .out_channels})
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ranks_remove_the_same_channels_and_stay_in_sync():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    result = results.get(timeout=5)
    assert result["size"] == 2
    assert result["shapes_equal"], "ranks disagree on the pruned architecture"
    # same channels kept + gradients all-reduced by the rebuilt DDP wrapper: identical weights after a step
    assert result["weights_equal"], result["diff"]
