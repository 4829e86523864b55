"""Inference engine: loaded-model cache, dynamic batching and device placement."""
