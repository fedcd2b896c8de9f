"""Using a trained model: loading a checkpoint, evaluating, predicting, exporting."""
