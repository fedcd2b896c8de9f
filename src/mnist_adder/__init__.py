"""mnist-adder: an MNIST image and a number 0..9 in, the digit and the sum out."""

__version__ = "0.1.0"
