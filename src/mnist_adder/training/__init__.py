"""What a training run is made of: the LightningModule, its metrics and callbacks, the pipeline."""
