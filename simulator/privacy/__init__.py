"""Differential privacy of the clients' uploads: clipping, Gaussian noise, accounting, the run's mechanism."""
