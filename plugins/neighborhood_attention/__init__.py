"""Neighborhood (sliding-window) attention, 1-D / 2-D, dilation, causal: NATTEN's semantics."""

from deploykit.plugins.neighborhood_attention.reference import (
    dense_mask,
    neighborhood_attention,
    sliding_window_attention,
    window_indices,
)

__all__ = ["neighborhood_attention", "sliding_window_attention", "window_indices", "dense_mask"]
