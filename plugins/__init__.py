"""deploykit's custom attention ops, one folder each (installed as ``deploykit.plugins``).

Each op folder holds ``reference.py``, the op's PyTorch semantics and the single source of
truth every other implementation (ONNX decomposition, Triton kernel, TensorRT plugin) is
tested against.
"""
