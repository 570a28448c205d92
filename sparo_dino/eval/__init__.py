"""Frozen-encoder evaluation: feature extraction and caches, k-NN, linear probe, shifted sets, few-shot."""
