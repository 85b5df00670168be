"""What runs inside the replica actors: replica.py (the SGD replica) and group.py (the driver's
handle on a group of them), comm.py (gradient averaging), optim.py, losses.py, evaluation.py,
batches.py."""
