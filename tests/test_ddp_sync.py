"""Pruning under DDP: every rank removes the channels rank 0 chose, and the DDP wrapper is rebuilt around them;
a decision that rests on a measurement (a latency target met or not) is rank 0's on every rank.

Two CPU processes with a gloo process group stand in for nnU-Net's multi-GPU run (which uses NCCL; the
synchronisation code is backend-agnostic: broadcast_object_list + a new DistributedDataParallel wrapper).
Each rank proposes a DIFFERENT set of channels to keep, as it would from its own batches' importance scores.
"""

import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_compress.network import CompressedUNet
from nnunet_compress.nnunet.pruning_trainer import PruningTrainerMixin
from nnunet_compress.pruning.class_guard import StepGuard
from nnunet_compress.pruning.taylor import PruningStep, TaylorSettings

sys.path.insert(0, str(Path(__file__).parent))
from test_class_guard import trainer_class  # noqa: E402

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

    def print_to_log_file(self, *args):
        pass


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


class StubPrediction:
    """The predicted seconds of a latency target, reduced to what a step reads: its calibrations are recorded."""

    def __init__(self):
        self.calibrated = []

    def fraction(self, net) -> float:
        return 0.9

    def calibrate(self, net, measured: float) -> None:
        self.calibrated.append(measured)


def taylor_with_a_latency_target(rank: int, own_timing: float) -> MiniTrainer:
    """MiniTrainer running nnUNetTrainerTaylorPruning's pruning step for --target-latency 0.5, with this rank's
    timer measuring `own_timing` of the parent's seconds; the channels a step keeps are fixed (scoring is not what
    this test is about)."""
    taylor = trainer_class("nnUNetTrainerTaylorPruning")
    trainer = MiniTrainer(rank)
    for name in ("pruning_step", "another_step_now", "fraction_after_step", "step_settings", "current_fraction",
                 "measure_latency"):
        setattr(trainer, name, getattr(taylor, name).__get__(trainer))
    trainer.settings = TaylorSettings(target_latency=0.5, step=0.1, recovery_epochs=0).validate()
    trainer.num_epochs, trainer.current_epoch, trainer.recovery_epochs = 4, 0, 0
    trainer.num_input_channels, trainer.configuration_manager = 1, SimpleNamespace(patch_size=(8, 8, 8))
    trainer.initial_cost, trainer.pruning_history = trainer.current_cost(), []
    trainer.class_guard = StepGuard(0.0)
    prediction = StubPrediction()
    trainer.latency_prediction = lambda: prediction
    trainer.latency_terms = SimpleNamespace(engine="a stub timer")
    trainer.timings_taken = 0

    def own_timer(net):
        trainer.timings_taken += 1
        return own_timing
    trainer._measure_latency = own_timer
    groups = trainer.prunable_groups()
    trainer.planned_step = lambda settings, latency, protected=None: PruningStep(groups, {groups[0].name: [0, 1]})
    return trainer


def _latency_worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        outcome = []
        # the ranks' own timings straddle the target, one way and then the other
        for timings in ((0.7, 0.4), (0.4, 0.7)):
            trainer = taylor_with_a_latency_target(rank, timings[rank])
            trainer.pruning_step()
            outcome.append({"target_reached": trainer.target_reached,
                            "fraction": trainer.pruning_history[-1]["fraction"],
                            "calibrated": trainer.latency_prediction().calibrated,
                            "timings_taken": trainer.timings_taken})
        gathered = [None, None]
        dist.all_gather_object(gathered, outcome)
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_two_ranks(worker):
    """Run `worker(rank, port, results)` in two processes of a gloo group; what rank 0 put in `results`."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results.get(timeout=5)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ranks_remove_the_same_channels_and_stay_in_sync():
    result = run_on_two_ranks(_worker)
    assert result["size"] == 2
    assert result["shapes_equal"], "ranks disagree on the pruned architecture"
    # same channels kept + gradients all-reduced by the rebuilt DDP wrapper: identical weights after a step
    assert result["weights_equal"], result["diff"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_whether_a_latency_target_is_reached_is_rank_zeros_measurement_on_every_rank():
    """Rank 0 times the pruned network; rank 1 takes no timing of its own (it would load the CPU rank 0 is timing)
    and follows: the same target decision, the same recorded fraction, the same calibration on both ranks."""
    rank0, rank1 = run_on_two_ranks(_latency_worker)
    for rank0_timing, reached, first, second in zip((0.7, 0.4), (False, True), rank0, rank1):
        assert first["target_reached"] is second["target_reached"] is reached
        assert first["fraction"] == second["fraction"] == rank0_timing
        assert first["calibrated"] == second["calibrated"] == [rank0_timing]
        assert (first["timings_taken"], second["timings_taken"]) == (1, 0)
