"""Chunked (memory-bounded) cross-entropy over a large vocabulary."""

from .chunked import ChunkedCrossEntropy, chunked_cross_entropy

__all__ = ["ChunkedCrossEntropy", "chunked_cross_entropy"]
