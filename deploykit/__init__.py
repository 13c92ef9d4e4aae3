"""deploykit: take a PyTorch transformer and ship it.

Stages (each reads the previous stage's artifact from disk and writes its own):
models -> export -> quantize -> runners -> verify / bench -> report.
The CLI (``deploykit.cli``) and the ``run`` pipeline call the same library functions.
"""

__version__ = "0.1.0"
