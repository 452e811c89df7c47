"""Retrieval evaluation: metrics as trec_eval / BEIR define them, exact top-k search over a
sharded corpus, TREC run files (``retrieval``), and a BEIR-format runner and CLI (``beir``).

``retrieval`` imports numpy and JAX only (no TensorFlow, no seqio).
"""
