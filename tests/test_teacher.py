"""The distillation teacher: rebuilt from compressed plans as the parent network, loaded checked, run on torch.

And the trainer mixin's one-step loss swap, on a stand-in for nnU-Net's trainer (the real trainers run in
tests/test_e2e_distillation.py).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from nnunet_compress.errors import CompressError
from nnunet_compress.network import CompressedUNet, compressed_arch_kwargs
from nnunet_compress.nnunet.teacher import build_parent_network, load_teacher, parent_architecture

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
LABELS = {"background": 0, "a": 1, "b": 2}


def parent_arch(features=(4, 8, 16)) -> dict:
    """An ``architecture`` entry as nnU-Net writes it into plans.json."""
    n = len(features)
    return {"network_class_name": PLAIN,
            "arch_kwargs": {"n_stages": n, "features_per_stage": list(features),
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def compressed_configuration(**compression) -> dict:
    return {"architecture": compressed_arch_kwargs({"architecture": parent_arch()}, **compression)}


def save_parent(path, input_channels=1, num_classes=3, features=(4, 8, 16), labels=LABELS, seed=0):
    torch.manual_seed(seed)
    net = build_parent_network(parent_arch(features), input_channels, num_classes, deep_supervision=True)
    net.apply(net.initialize)
    torch.save({"network_weights": net.state_dict(), "init_args": {"dataset_json": {"labels": labels}}}, path)
    return net


def test_parent_architecture_is_the_parent_plans_entry():
    cfg = compressed_configuration(tucker_ranks={"encoder.stages.1.0.convs.0.conv": [4, 4]})
    assert parent_architecture(cfg) == parent_arch()
    pruned = {"architecture": compressed_arch_kwargs({"architecture": parent_arch()}, per_fold_channels=True)}
    assert parent_architecture(pruned) == parent_arch()
    with pytest.raises(CompressError, match="--distill"):
        parent_architecture({"architecture": parent_arch()})


def test_teacher_is_the_parent_in_eval_mode_without_gradients(tmp_path):
    parent = save_parent(tmp_path / "parent.pth").eval()
    teacher = load_teacher(tmp_path / "parent.pth", parent_architecture(compressed_configuration()), 1, 3, LABELS,
                           deep_supervision=True)
    assert type(teacher).__name__ == "PlainConvUNet" and not isinstance(teacher, CompressedUNet)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        out, ref = teacher(x), parent(x)
    assert len(out) == 2 and all(torch.equal(a, b) for a, b in zip(out, ref))  # one output per decoder stage


def test_teacher_forward_never_reaches_the_openvino_engine(tmp_path, monkeypatch):
    """Under no_grad in eval mode a CompressedUNet would go to the engine; the teacher is a plain network."""
    from nnunet_compress.inference import openvino_engine
    monkeypatch.setenv("NNUNET_COMPRESS_CPU_ENGINE", "openvino")
    monkeypatch.setenv("NNUNET_COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    save_parent(tmp_path / "parent.pth")
    teacher = load_teacher(tmp_path / "parent.pth", parent_architecture(compressed_configuration()), 1, 3, LABELS,
                           deep_supervision=False)
    calls = []
    monkeypatch.setattr(openvino_engine, "run", lambda *a, **k: calls.append(a))
    before = len(openvino_engine.STATS.conversions)
    with torch.no_grad():
        teacher(torch.randn(1, 1, 16, 16, 16))
    assert not calls and len(openvino_engine.STATS.conversions) == before
    assert not (tmp_path / "cache").exists()


def test_bad_teachers_are_refused_with_the_reason(tmp_path):
    arch = parent_architecture(compressed_configuration())

    def refused(path, match):
        with pytest.raises(CompressError, match=match):
            load_teacher(path, arch, 1, 3, LABELS, deep_supervision=False)

    refused(tmp_path / "missing.pth", "does not exist")
    (tmp_path / "empty.pth").write_bytes(b"")
    refused(tmp_path / "empty.pth", "is empty")
    save_parent(tmp_path / "good.pth")
    (tmp_path / "corrupt.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:3000])
    refused(tmp_path / "corrupt.pth", "corrupt")
    save_parent(tmp_path / "classes.pth", num_classes=4, labels={**LABELS, "c": 3})
    refused(tmp_path / "classes.pth", "trained for labels")
    save_parent(tmp_path / "classes_nolabels.pth", num_classes=4, labels=None)
    ckpt = torch.load(tmp_path / "classes_nolabels.pth", weights_only=False)
    del ckpt["init_args"]
    torch.save(ckpt, tmp_path / "classes_nolabels.pth")
    refused(tmp_path / "classes_nolabels.pth", "predicts 4 classes but the dataset has 3")
    save_parent(tmp_path / "channels.pth", input_channels=2)
    refused(tmp_path / "channels.pth", "takes 2 input channel")
    save_parent(tmp_path / "wider.pth", features=(4, 8, 32))
    refused(tmp_path / "wider.pth", "does not fit the parent architecture")
    # a compressed (factorised) network's checkpoint is no teacher
    student = CompressedUNet(1, 3, PLAIN, tucker_ranks={"encoder.stages.1.0.convs.0.conv": [4, 4]},
                             **build_kwargs())
    torch.save({"network_weights": student.state_dict()}, tmp_path / "student.pth")
    refused(tmp_path / "student.pth", "not a network of the parent architecture")


def build_kwargs() -> dict:
    import pydoc
    kwargs = dict(parent_arch()["arch_kwargs"])
    for key in parent_arch()["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    return kwargs


# ---- the trainer mixin's loss swap, on a stand-in for nnU-Net's trainer ------------------------------------------

class FakeTrainer:
    """What DistillationTrainerMixin uses of nnUNetTrainer: train_step calling self.loss, and the epoch end."""

    def __init__(self, student, label_loss):
        self.network, self.loss, self.device, self.is_ddp = student, label_loss, torch.device("cpu"), False
        self.label_manager = SimpleNamespace(has_regions=False)
        self.log = []

    def train_step(self, batch):
        loss = self.loss(self.network(batch["data"]), batch["target"])
        return {"loss": loss.detach().numpy()}

    def on_train_epoch_end(self, outputs):
        pass

    def print_to_log_file(self, *args):
        self.log.append(" ".join(map(str, args)))


def test_mixin_swaps_the_loss_for_one_step_and_logs_both_terms(tmp_path):
    from nnunet_compress.distillation.loss import DistillationSettings, soft_target_kl
    from nnunet_compress.nnunet.distillation_trainer import DistillationTrainerMixin

    class Trainer(DistillationTrainerMixin, FakeTrainer):
        pass

    torch.manual_seed(0)
    teacher = build_parent_network(parent_arch(), 1, 3, deep_supervision=False).eval()
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    label_loss = lambda out, target: torch.nn.functional.cross_entropy(out, target)
    trainer = Trainer(student, label_loss)
    trainer.distillation = DistillationSettings(alpha=0.25, temperature=2.0)
    trainer.teacher, trainer.distillation_history, trainer.current_epoch = teacher, [], 0
    batch = {"data": torch.randn(2, 1, 16, 16, 16), "target": torch.randint(0, 3, (2, 16, 16, 16))}
    out = trainer.train_step(batch)
    assert trainer.loss is label_loss  # restored after the step
    with torch.no_grad():
        s, t = student(batch["data"]), teacher(batch["data"])
        label, soft = float(label_loss(s, batch["target"])), float(soft_target_kl(s, t, 2.0))
    assert float(out["distill_label"]) == pytest.approx(label, rel=1e-5)
    assert float(out["distill_teacher"]) == pytest.approx(soft, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(0.75 * label + 0.25 * soft, rel=1e-5)
    trainer.on_train_epoch_end([out, out])
    assert trainer.distillation_history == [{"epoch": 0, "label_loss": pytest.approx(label, rel=1e-5),
                                             "teacher_term": pytest.approx(soft, rel=1e-5)}]
    assert "[distill] label loss" in trainer.log[-1]
    # without distillation in the plans the step is nnU-Net's own
    trainer.distillation = None
    assert set(trainer.train_step(batch)) == {"loss"}
