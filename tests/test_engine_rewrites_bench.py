"""benchmarks/engine_rewrites.py's channels-last row returns the same logits as the product's layout."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import engine_rewrites  # noqa: E402


def test_transposing_copy_equals_a_permute_across_block_edges():
    # 2 batches, 5*6*7 = 210 voxels: blocks of 64 end mid-row, and 25 channels are no multiple of a vector
    logits = np.random.default_rng(0).standard_normal((2, 5, 6, 7, 25)).astype(np.float32)
    engine_rewrites.TRANSPOSE_CHUNK, saved = 64, engine_rewrites.TRANSPOSE_CHUNK
    try:
        out = engine_rewrites.transposed_to_ncdhw(logits)
    finally:
        engine_rewrites.TRANSPOSE_CHUNK = saved
    assert out.shape == (2, 25, 5, 6, 7) and out.is_contiguous()
    assert torch.equal(out, torch.from_numpy(logits).permute(0, 4, 1, 2, 3))


def test_channels_last_module_is_the_network_with_channels_moved_last():
    net = torch.nn.Conv3d(1, 3, 1)
    x = torch.randn(1, 1, 2, 3, 4)
    with torch.no_grad():
        moved = engine_rewrites.ChannelsLastLogits(net)(x)
        assert moved.shape == (1, 2, 3, 4, 3)
        assert torch.equal(engine_rewrites.transposed_to_ncdhw(moved.contiguous().numpy()), net(x))
