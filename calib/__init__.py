"""Data sources for calibration and evaluation (text, images) and the range calibrators."""
