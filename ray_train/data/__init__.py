"""Data a run trains on: dataset.py (the in-memory Dataset and its splits) and loaders.py (the
named datasets and file formats)."""
