"""The demo and the tiny synthetic pipeline the end-to-end tests and benchmarks share.

:mod:`.tiny` drives nnU-Net's own commands (plan and preprocess, train on the CPU, predict, evaluate) and this
package's command (in a subprocess, as a user would) on a small synthetic CT dataset; :mod:`.run` is
``nnunet-compress demo``: every method on that dataset, side by side. Not part of the library's core: only the
CLI imports it, and it may import everything except the CLI.
"""
