from mnist_adder.data.datamodule import MnistSumDataModule
from mnist_adder.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist, normalize

__all__ = ["MNIST_MEAN", "MNIST_STD", "MnistSumDataModule", "load_mnist", "normalize"]
