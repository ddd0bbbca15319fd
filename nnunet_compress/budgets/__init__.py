"""Budgets in seconds per patch (``--target-latency``) for Tucker ranks and pruned channels: one home for the
cost model, the allocation in seconds, the engine's timings and the calibration against the measured network.

Pure maths (nothing here runs an engine; each module imports only the foundation and the methods' maths):
:mod:`.cost_model` (convolution sites, the fitted per-site model, the FLOP-based alternative, which sites a search
needs), :mod:`.channels` (predicted seconds of a network as pruning removes channels), :mod:`.calibration`
(the loop that corrects a predicted goal by whole-network measurements, given as callables, and its record).
Engine-facing: :mod:`.timing` (one convolution and whole patches on OpenVINO or torch), :mod:`.latency_model`
(the measured model of this machine and its cache), :mod:`.measured` (the original timed, candidates timed
against it, the reports' per-layer seconds). May import the foundation, the methods' maths (tucker, pruning) and
:mod:`nnunet_compress.inference`; never the nnU-Net adapters, the workflows or the CLI, so the trainers use it.
"""
