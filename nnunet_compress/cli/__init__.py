"""The ``nnunet-compress`` command line: the entry point (:mod:`.main`), the options several commands share
(:mod:`.options`), and one module per family of sub-commands (:mod:`.tucker`, :mod:`.pruning`, :mod:`.evaluation`,
:mod:`.distill`, :mod:`.demo`), each registering its sub-commands with the parser. The top layer: it may import
every other part of the package, and no part of the package imports it. ``python -m nnunet_compress.cli`` runs it
(:mod:`.__main__`).
"""
