"""Tucker decomposition of convolution kernels and the choice of ranks: pure maths (torch and tensorly).

:mod:`.decomposition` turns one trained k×k×k convolution into 1×1×1 → k×k×k core → 1×1×1 (Tucker-2 on the two
channel modes, tensorly's ``partial_tucker``) and replaces layers of a network in place; :mod:`.ranks` chooses the
ranks (uniform ratio, fixed, kept energy, or a global parameter/FLOP budget, all above a rank floor) and holds the
:class:`~.ranks.RankPolicy` settings; :mod:`.budget_guard` checks a budget allocation against the uniform ratio of
the same cost on calibration patches. May import only :mod:`nnunet_compress.errors`, ``settings`` and ``costs``;
nothing here knows nnU-Net's files.
"""
