"""What is fitted on trained weights, after training: the temperatures and the "not a digit" detector."""
