"""Knowledge distillation from the uncompressed parent: the settings and the loss, pure maths.

:mod:`.loss` holds :class:`~.loss.DistillationSettings` (α, temperature, teacher checkpoint) and the loss
(1 − α)·nnU-Net's loss + α·T²·KL(teacher ‖ student) over the deep-supervision outputs, with a binary form for
region-based training. The trainer side (building the teacher, running it on each batch) lives in
:mod:`nnunet_compress.nnunet`. May import only :mod:`nnunet_compress.errors` and ``settings``.
"""
