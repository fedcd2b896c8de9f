"""Using a trained model: loading a checkpoint, calibrating it, predicting, exporting, the demo."""
