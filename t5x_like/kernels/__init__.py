"""Attention kernels behind one entry point: ``attention.dot_product_attention``."""
