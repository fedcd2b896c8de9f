"""Tools around the project: the benchmark against a bare PyTorch loop, the layer table, local nodes."""
