"""inference/decoder_fold.py: the graph the engine converts, with the decoder's concatenations folded away, must
give the network's own logits (checked against torch's forward pass, on factorised and plain upsampling)."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_compress.inference import decoder_fold
from nnunet_compress.tucker.decomposition import replace_convs


def small_unet() -> nn.Module:
    torch.manual_seed(0)
    net = PlainConvUNet(2, 4, [8, 16, 24, 32], nn.Conv3d, 3, [1, 2, 2, 2], 2, 3, 2, conv_bias=True,
                        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
    for m in net.modules():  # non-trivial norm parameters, so a wrong channel order would show
        if isinstance(m, nn.InstanceNorm3d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net.eval()


def factorise(net: nn.Module, transposed: bool) -> dict:
    ranks = {name: (max(2, m.out_channels // 2), max(2, m.in_channels // 2)) for name, m in net.named_modules()
             if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and max(m.kernel_size) > 1
             and (transposed or not isinstance(m, nn.ConvTranspose3d))}
    replace_convs(net, ranks, decompose=True)
    return ranks


@pytest.mark.parametrize("transposed", [False, True], ids=["plain-upsampling", "factorised-upsampling"])
def test_folded_graph_gives_the_networks_logits_without_concatenations(transposed):
    net = small_unet()
    factorise(net, transposed)
    x = torch.randn(1, 2, 24, 24, 16)
    folded = decoder_fold.engine_graph(net)
    assert folded is not net and folded.folded == 3  # every decoder stage begins with a factorised conv
    with torch.no_grad():
        expected, got = net(x), folded(x)
        graph = torch.jit.trace(folded, x, check_trace=False).inlined_graph
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert "aten::cat" not in str(graph)
    # the upsampling now emits the stage's first rank, not the stage's width
    first_stage = folded.stages[0]
    assert first_stage.skip_proj.out_channels == net.decoder.stages[0].convs[0].conv.rank_in


def test_unfactorised_network_is_left_as_it_is():
    net = small_unet()
    assert decoder_fold.engine_graph(net) is net
    net.decoder.deep_supervision = True
    factorise(net, False)
    assert decoder_fold.engine_graph(net) is net  # deep supervision: several outputs, not the engine's graph


def test_the_engine_converts_the_folded_graph():
    pytest.importorskip("openvino")
    import openvino as ov

    from nnunet_compress.inference import openvino_engine
    net = small_unet()
    factorise(net, True)
    x = torch.randn(1, 2, 24, 24, 16)
    model = openvino_engine.convert(net, x)
    assert "Concat" not in {op.get_type_name() for op in model.get_ops()}
    compiled = openvino_engine.CompiledModel(ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
    with torch.no_grad():
        expected = net(x)
    got = compiled.infer(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
