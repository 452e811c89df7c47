"""Data: text sources, packing and (in submodules that need them) seqio / TensorFlow.

Only modules under ``t5x_like/data/`` may import TensorFlow or seqio, and only
where they need it: ``text`` and ``packing`` are numpy-only so the core runs on
hosts without TensorFlow.
"""
