"""Real images that ship with scikit-learn: the 1,797 handwritten 8x8 digits (UCI).

No download: ``sklearn.datasets.load_digits`` reads a file inside the scikit-learn wheel.
"""

from __future__ import annotations

import numpy as np


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 in [0, 1], shape (1797, 8, 8), and int64 labels 0..9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    return images, data.target.astype(np.int64)
