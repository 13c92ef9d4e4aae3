"""Linear (kernelized) attention: elu+1 / relu / sigmoid feature maps, causal with decay."""

from deploykit.plugins.linear_attention.reference import (
    FEATURE_MAPS,
    linear_attention,
    linear_attention_naive,
)

__all__ = ["linear_attention", "linear_attention_naive", "FEATURE_MAPS"]
