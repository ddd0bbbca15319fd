"""Filter pruning of nnU-Net's U-Nets: pure tensor maths, usable and tested without nnU-Net training.

:mod:`.dependency` maps which channels must be removed together (a conv's output channels, its norm, and the input
channels of every consumer, skip connections included); :mod:`.importance` scores channels (first-order Taylor,
output-normalised or loss-based, L1) and picks the ones to keep; :mod:`.surgery` removes them physically;
:mod:`.taylor` is one Taylor/L1 pruning step and the settings that drive it; :mod:`.step_size` stops the step that
crosses a FLOP or parameter target at it; :mod:`.sauron` is Sauron's distances, regulariser and thresholds;
:mod:`.feature_maps` captures the maps both score; :mod:`.class_guard` undoes a step after which a class collapsed;
:mod:`.recovery` keeps the last epochs of a schedule free of pruning steps.
May import only :mod:`nnunet_compress.errors`, ``settings`` and ``costs``.
"""
