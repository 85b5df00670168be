"""Metrics: sink.py (stdout lines, progress bars, TensorBoard tags), tensorboard.py (the writer),
images.py (confusion matrix, error grid)."""
