"""nnunet-compress: make trained nnU-Net v2 networks cheaper to run while keeping their Dice.

Three methods, each an ordinary nnU-Net plugin: post-training Tucker decomposition of convolution kernels,
Taylor first-order filter pruning and Sauron single-phase pruning. Pure tensor maths lives in
:mod:`nnunet_compress.tucker.decomposition` and :mod:`nnunet_compress.pruning`; nnU-Net glue is kept thin.
"""

__version__ = "0.1.0"
