"""ray-train: sync SGD, Downpour async SGD and voting ensembles of PyTorch models on Ray actors."""
