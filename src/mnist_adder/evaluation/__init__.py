"""Measuring a trained model: the test of a checkpoint, robustness, the detector against baselines."""
