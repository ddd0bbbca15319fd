"""What a compressed model bought and what it cost: profiles, metrics, statistics and reports.

:mod:`.profiling` (latency and peak memory next to the counts of :mod:`nnunet_compress.costs`), :mod:`.compare`
(``nnunet-compress compare``: predictions of a base and compressed models, per-class Dice and surface Dice
(:mod:`.case_metrics`, :mod:`.surface_dice`), paired tests with multiple-testing correction (:mod:`.stats`),
Markdown and plots (:mod:`.report_markdown`, :mod:`.report_plots`)). May import :mod:`nnunet_compress.nnunet` and
everything below it; the workflows use the profiles, so nothing here imports a workflow.
"""
