"""Adders that add: the sum's distribution is the digit's distribution shifted by the number.

If the digit is d with probability p(d) and the number n is given, the sum s = d + n has probability

    P(s) = sum_d p(d) k(s - d)        for s in 0..18,

a 1-D convolution of the digit distribution with a kernel k over the 10 possible shifts 0..9. With k the
one-hot of n this is exact probabilistic addition (`ShiftAdder`, no parameters; the neuro-symbolic
"MNIST addition" of DeepProbLog and its successors); `ConvAdder` learns k from n instead.

Both take `cat([digit_probs, number_onehot])` (DigitSumNet's adder_input softmax or detached: a
distribution, never raw logits) and return the log of P as the sum logits, so softmax gives P back and
cross-entropy, calibration (temperature scaling) and ECE work on them as on any logits. Everything is
computed in log space (a logsumexp over d), in float32 also under bf16 autocast, and no output goes
below LOG_PROB_FLOOR: an impossible sum (s < n or s > n + 9) gets the floor, not -inf, so that the
training loss with label smoothing (which averages -log P over all 19 sums), the ONNX export and every
gradient stay finite. The floor's mass, at most 18 * exp(-30) < 1e-11, is far below float32's
resolution of a probability near 1.

MNIST addition (models/number_sum.py) uses the same convolution without the floor (`floor=None`): there
the log-probability of the true sum is the loss itself, and a clamp has no gradient, so a floored
position would give its images none.
"""

import math

import torch
from torch import nn

from mnist_adder.classes import NUM_DIGITS, NUM_SUMS

LOG_PROB_FLOOR = -30.0
# The kernel logits are the weights times this gain. Adam moves each weight by about the learning rate
# per step, whatever its scale, and a sharp kernel needs logits about 10 apart: without the gain the
# kernels stayed blurred for long, the sum far less certain than the digit (100 steps of batch 128 with
# one_per_sum held out: test/sum_coherence_gap 0.66 without it, 0.06 with it, seed 1).
KERNEL_GAIN = 10.0
# Stands for log 0 (a sum with no such digit, s - d outside 0..9; an unreachable carry in
# models/number_sum.py): exp() of it is exactly 0 in float32, and it stays finite, unlike -inf, whose
# logsumexp gradient is NaN where every term is -inf. Far below any log-probability a float32 loss
# reaches: a true log P of -1e4 is only 100 digit positions at -100 each, which -1e4 could not stand
# for. The log-probabilities it masks are float32 (it would overflow fp16).
LOG_ZERO = -1.0e30


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    """log(probs) in float32, floored: a probability that underflowed to 0 gives the floor, not -inf."""
    return probs.float().clamp_min(math.exp(LOG_PROB_FLOOR)).log()


class ShiftConvolution(nn.Module):
    """log P(s) = logsumexp_d [log p(d) + log k(s - d)], s in 0..18: the log of the convolution of the
    digit distribution p with a kernel k over the shifts 0..9, floored at LOG_PROB_FLOOR for the adders
    (exact for MNIST addition, see `convolve`)."""

    shift_of: torch.Tensor
    has_shift: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        sums, digits = torch.arange(NUM_SUMS)[:, None], torch.arange(NUM_DIGITS)[None, :]
        shift = sums - digits  # [19, 10]: the shift that takes digit d to sum s
        # Not persistent: constants of the structure, not weights; checkpoints hold only learned values.
        self.register_buffer("shift_of", shift.clamp(0, NUM_DIGITS - 1), persistent=False)
        self.register_buffer("has_shift", (shift >= 0) & (shift < NUM_DIGITS), persistent=False)

    def convolve(
        self,
        digit_log_probs: torch.Tensor,
        shift_log_probs: torch.Tensor,
        floor: float | None = LOG_PROB_FLOOR,
    ) -> torch.Tensor:
        """[B, 10] digit log-probabilities and [B, 10] kernel log-probabilities (float32) -> [B, 19] sum
        log-probs, none below `floor`. With `floor=None` they are exact, with their full gradient: every
        sum 0..18 has at least one digit, so none is log 0."""
        terms = shift_log_probs[:, self.shift_of] + digit_log_probs[:, None, :]  # [B, 19, 10]
        terms = terms.masked_fill(~self.has_shift, LOG_ZERO)
        log_probs = terms.logsumexp(dim=-1)
        return log_probs if floor is None else log_probs.clamp_min(floor)


class ShiftAdder(ShiftConvolution):
    """[B, 20] (digit probabilities ++ number one-hot) -> [B, 19] sum log-probabilities, exactly.

    P(s) = sum_d p(d) P(n = s - d): the number's one-hot is the kernel, so P(s) = p(s - n). No learned
    parameters: nothing to memorise, so a (digit, number) pair or a sum never seen in training is added
    like any other, and the sum is exactly as certain as the digit it comes from.
    """

    def forward(self, adder_input: torch.Tensor) -> torch.Tensor:
        digit_probs, number_probs = adder_input.split(NUM_DIGITS, dim=-1)
        return self.convolve(_log_probs(digit_probs), _log_probs(number_probs))


class ConvAdder(ShiftConvolution):
    """[B, 20] (digit probabilities ++ number one-hot) -> [B, 19] sum log-probabilities, learned.

    The sum distribution is the digit distribution convolved with a kernel over the 10 shifts 0..9, and
    the kernel is predicted from the number alone: softmax of a linear map of the one-hot, i.e. a learned
    10x10 table whose column n holds number n's kernel logits (100 parameters). Nothing says that number
    n shifts by n: that is learned from the sum labels.

    Why it generalises to pairs and sums it never saw: the convolution is shift-equivariant (moving
    the digit's mass by one moves the sum's by one, with the same weights for every digit), and the
    kernel depends on n only, never on the digit. So every training sample with number n, whatever its
    digit, trains the same kernel; once it puts its mass on shift n, the adder adds n to every digit,
    including digits never paired with n in training (held-out pairs), and it can output a sum class it
    was never shown (held-out sums: there are no per-sum weights or biases that training could drive
    down). An MLP on cat(digit, number) has neither property: it can, and does, learn a table of the
    pairs it saw. With the kernel set to the one-hot of n it is exactly `ShiftAdder`.
    """

    def __init__(self) -> None:
        super().__init__()
        # Fed a one-hot, a bias would only add the same logits to every number's kernel.
        self.kernel = nn.Linear(NUM_DIGITS, NUM_DIGITS, bias=False)
        nn.init.zeros_(self.kernel.weight)  # every kernel starts uniform over the shifts

    def forward(self, adder_input: torch.Tensor) -> torch.Tensor:
        digit_probs, number_onehot = adder_input.split(NUM_DIGITS, dim=-1)
        shift_log_probs = (KERNEL_GAIN * self.kernel(number_onehot)).float().log_softmax(dim=-1)
        return self.convolve(_log_probs(digit_probs), shift_log_probs)
