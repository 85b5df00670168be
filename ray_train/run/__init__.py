"""The run: loop.py (one loop for every engine), job.py (what a run hands its strategy),
checkpoint.py, failure.py, signals.py, files.py (atomic writes), outputs.py (run folder, model.pt)."""
