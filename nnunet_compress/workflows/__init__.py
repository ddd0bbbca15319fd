"""Model folder in, model folder out: the post-training operations on a trained nnU-Net model.

:mod:`.tucker` (ranks chosen on the first fold's weights, compressed plans, every fold decomposed, report),
:mod:`.rank_selection` (the one entry that chooses Tucker ranks, budgets checked and calibrated), :mod:`.plans`
(``plan tucker|taylor|sauron``: compressed plans beside the parent's),
:mod:`.prune` (one-shot L1 or Taylor pruning of every fold), :mod:`.convert` (the unchanged model as a
CompressedUNet folder that runs on the CPU engine), :mod:`.pseudo_dataset` (a raw dataset labelled by a parent
model). All of them write through :mod:`.derived_folder`, the one routine that writes a derived model folder
(source only read, output appears in one rename). Above :mod:`nnunet_compress.nnunet` and ``evaluation``, below
TotalSegmentator and the CLI.
"""
