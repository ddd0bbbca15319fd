"""CPU inference of nnU-Net networks: which engine runs a forward pass, and how it is set up.

At CPU inference (no autograd, eval mode, float32) :class:`nnunet_compress.network.CompressedUNet` hands its
forward pass to OpenVINO (:mod:`.openvino_engine`), which ran both the original and the compressed
TotalSegmentator networks faster than torch did on the CPUs measured (README, "Performance"). Conversion happens
once per architecture, weights and input shape and is cached on disk (:mod:`.model_cache`); the settings
(engine, precision, cache folder) come from environment variables (:mod:`.settings`), so nnU-Net's and
TotalSegmentator's own commands pick them up without new flags. Where the engine cannot take a network, the
forward pass runs on torch with one warning.

This package may import torch, the network building blocks and :mod:`nnunet_compress.errors`; it must not import
the nnU-Net-facing adapters, the workflows or the CLI.
"""
