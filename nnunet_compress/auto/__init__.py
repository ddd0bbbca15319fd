"""``nnunet-compress auto``: the fastest model within a Dice budget, found by building, timing and grading
candidates made by the existing workflows.

Modules: :mod:`.candidates` (the specs and the commands that rebuild each), :mod:`.quality_data` (choosing and
held-out cases), :mod:`.build` (one candidate's model folder), :mod:`.grading` (nnU-Net's predictor and evaluation,
side-by-side timing), :mod:`.search` (the loop, resume, time budget; :func:`.search.run_auto` is the entry point)
and :mod:`.report`. It sits above ``workflows`` (it drives them) and may import every layer below; only the
command line imports it.
"""
