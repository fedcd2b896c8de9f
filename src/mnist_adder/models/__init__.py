from mnist_adder.models.adders import ConvAdder, ShiftAdder
from mnist_adder.models.convnet import ConvBackbone, MLPAdder
from mnist_adder.models.digit_sum import DigitSumNet
from mnist_adder.models.lenet import LeNet
from mnist_adder.models.seed import SeedAdder, SeedBackbone

__all__ = [
    "ConvAdder",
    "ConvBackbone",
    "DigitSumNet",
    "LeNet",
    "MLPAdder",
    "SeedAdder",
    "SeedBackbone",
    "ShiftAdder",
]
