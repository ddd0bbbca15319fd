"""TotalSegmentator: compressed homes that TotalSegmentator's own CLI and Python API run unchanged.

:mod:`.home` finds the models a task runs (TotalSegmentator's task table), compresses or converts each one with the
workflows and writes a new home whose config keeps TotalSegmentator offline; :mod:`.shapes` holds its
architectures as nnU-Net plans (docs/totalsegmentator_architecture.md); :mod:`.standin` writes homes with those
architectures and random weights for tests and benchmarks, since the real weights cannot be downloaded here. May
import the workflows and everything below them.
"""
