"""The task's classes: the digits 0..9 (the digit head's, and the number added) and their sums 0..18."""

NUM_DIGITS = 10
NUM_SUMS = 2 * NUM_DIGITS - 1
