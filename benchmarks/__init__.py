"""The project's benchmark tools, run from the repository root as ``python -m benchmarks.NAME`` (docs/benchmarks.md
lists every one with its duration and output).

They measure what the package does (speed per engine, budgets, distillation, stability over seeds, TotalSegmentator
end to end) and write their summaries to ``benchmarks/results/``. Being a package, they share helpers through
:mod:`benchmarks.common`, :mod:`benchmarks.archs` and :mod:`benchmarks.engines` by plain imports. They may import
anything from ``nnunet_compress``; nothing in ``nnunet_compress`` or ``trainers`` imports them (the layer test in
tests/test_import_structure.py checks it), so a benchmark can change without touching what ships.
"""
