"""Collect the feature maps of every prunable channel group during a training forward pass.

Sauron's regulariser needs, inside the same autograd graph as the segmentation loss, the output of every prunable
block. Forward hooks on the blocks' activation modules deliver them without touching the network's code, so the
network stays nnU-Net's own class. Hooks run inside ``torch.compile``'d networks too (dynamo traces them and
replays the list appends), which tests/test_feature_maps.py checks against the eager result.
"""

from __future__ import annotations

from torch import Tensor, nn


class FeatureMapRecorder:
    """Forward hooks on the activation module(s) of each group; ``take()`` returns and clears what was recorded.

    Only training-mode forward passes with gradients are recorded, so validation and inference cost nothing.
    Call ``attach`` again after channel surgery (modules may be replaced).
    """

    def __init__(self):
        self._maps: dict[str, list[Tensor]] = {}
        self._handles = []

    def attach(self, net: nn.Module, groups) -> "FeatureMapRecorder":
        self.detach()
        for group in groups:
            for name in group.activations:
                module = net.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._hook_for(group.name)))
        return self

    def _hook_for(self, group_name: str):
        def hook(module, inputs, output):
            if module.training and output.requires_grad:
                self._maps.setdefault(group_name, []).append(output)
        return hook

    def take(self) -> dict[str, list[Tensor]]:
        maps, self._maps = self._maps, {}
        return maps

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._maps = {}
