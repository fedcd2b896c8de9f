"""The exact distribution of the sum of two N-digit numbers from the 2N digit distributions.

Digit i of the sum (least significant first) is (a_i + b_i + c_i) mod 10, with c_i the carry into
position i (c_0 = 0) and c_{i+1} = 1 when a_i + b_i + c_i >= 10; digit N of the sum is c_N. So

  1. per position, the distribution of the pair sum t_i = a_i + b_i (0..18) is the convolution of the two
     digit distributions: the `shift` adder's convolution (models/adders.py) with the second image's
     distribution in place of the number's one-hot;
  2. the carry chain is a forward pass over the positions with two states (carry 0 or 1): for a given sum
     S with digits s_0..s_N, alpha_{i+1}(c') = sum_c alpha_i(c) P(t_i = s_i - c + 10 c'), alpha_0 = (1, 0),
     and P(S) = alpha_N(s_N). Every (carry path, pair-sum sequence) that spells S is counted once, as
     the pair sums are fixed by S and the carries.

That is O(N) per example and exact, computed in log space (`sum_log_prob`); the training loss is its
negative for the true sum. Nothing is floored on the way (the adders' LOG_PROB_FLOOR is not applied
here): a clamp has no gradient, so digits read confidently wrong, whose pair sums fall below any floor,
would get none back from the loss. Impossible terms and unreachable carries are masked with LOG_ZERO
instead, so the loss is -log P(true sum) with its true gradient wherever P > 0 in float32. Sums are
held as their N + 1 digits, not as integers: at N = 100 a sum has 101 digits, far beyond int64.

The most probable sum (`map_sum`) cannot be found by enumerating the 2 * 10^N - 1 sums. It is found
exactly by a forward pass over prefixes of the sum's digits that keeps, per position, only the prefixes
whose forward vector (alpha(0), alpha(1)) can still win (see `map_sum`).
"""

import numpy as np
import torch
from torch import nn

from mnist_adder.classes import NUM_DIGITS, NUM_SUMS
from mnist_adder.digit_numbers import add_digits
from mnist_adder.models.adders import LOG_ZERO, ShiftConvolution


class NumberSumNet(nn.Module):
    """Images [B, 2N, 1, 28, 28] (the N digits of the first number, most significant first, then the
    second's) -> digit logits [B, 2N, 10], read by `backbone` on each image; `sum_log_prob` gives the
    exact log P(sum) of the two numbers from them."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.convolution = ShiftConvolution()

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
        """Inputs of the right shape (blank images of two one-digit numbers): for layer tables."""
        return (torch.zeros(batch, 2, 1, 28, 28),)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, count = images.shape[:2]
        return self.backbone(images.flatten(0, 1)).view(batch, count, NUM_DIGITS)

    def pair_sum_log_probs(self, digit_logits: torch.Tensor) -> torch.Tensor:
        """Digit logits [B, 2N, 10] -> log P(a_i + b_i = t) [B, N, 19], position 0 the least significant."""
        return pair_sum_log_probs(digit_logits, self.convolution)

    def sum_log_prob(self, digit_logits: torch.Tensor, sum_digits: torch.Tensor) -> torch.Tensor:
        """log P(sum) [B] of the sums given as digits [B, N + 1] (most significant first)."""
        return carry_chain_log_prob(self.pair_sum_log_probs(digit_logits), sum_digits)


def pair_sum_log_probs(digit_logits: torch.Tensor, convolution: ShiftConvolution) -> torch.Tensor:
    """Digit logits [B, 2N, 10] (first number's digits then the second's, most significant first) ->
    log P(a_i + b_i = t) [B, N, 19], least significant position first, in float32, exact (no floor)."""
    batch, count, _ = digit_logits.shape
    digits = count // 2
    log_probs = digit_logits.float().log_softmax(dim=-1).flip(1)  # least significant first
    # flip(1) reverses the whole row: positions 0..N-1 are now the second number's, N..2N-1 the first's.
    second, first = log_probs[:, :digits], log_probs[:, digits:]
    pair = convolution.convolve(first.reshape(-1, NUM_DIGITS), second.reshape(-1, NUM_DIGITS), floor=None)
    return pair.view(batch, digits, NUM_SUMS)


def _chain_indices(sum_digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sums given as digits [B, N + 1] (most significant first): the pair sum t = s_i - c + 10 c'
    [B, N, 2 (c), 2 (c')] that position i needs for carry c in and c' out (clamped into 0..18), and
    whether it is one (0 <= t <= 18)."""
    low_first = sum_digits.flip(1)[:, :-1]  # [B, N], the sum's digits s_0..s_{N-1}
    carry = torch.arange(2, device=sum_digits.device)
    needed = low_first[:, :, None, None] - carry[:, None] + 10 * carry[None, :]
    valid = (needed >= 0) & (needed < NUM_SUMS)
    return needed.clamp(0, NUM_SUMS - 1), valid


def carry_chain_log_prob(pair_log_probs: torch.Tensor, sum_digits: torch.Tensor) -> torch.Tensor:
    """Exact log P(sum) [B] from the pair-sum log-probabilities [B, N, 19] (least significant position
    first) of sums given as digits [B, N + 1] (most significant first; the first is the last carry, 0
    or 1). O(N): one two-state step per position."""
    batch, digits, _ = pair_log_probs.shape
    needed, valid = _chain_indices(sum_digits)
    # [B, N, 4] -> [B, N, 2, 2]: log P(t_i = the pair sum that carry c in, c' out needs).
    terms = pair_log_probs.gather(2, needed.flatten(2)).view(batch, digits, 2, 2)
    terms = terms.masked_fill(~valid, LOG_ZERO)
    alpha = pair_log_probs.new_tensor([0.0, LOG_ZERO]).expand(batch, 2)  # carry 0 into position 0
    for position in range(digits):
        alpha = (alpha[:, :, None] + terms[:, position]).logsumexp(dim=1)
    top = sum_digits[:, 0]
    log_prob = alpha.gather(1, top.clamp(0, 1)[:, None]).squeeze(1)
    return log_prob.masked_fill(top > 1, LOG_ZERO)


def argmax_digit_sum(digit_logits: torch.Tensor) -> torch.Tensor:
    """The field's usual prediction: the sum of the most probable digits, as digits [B, N + 1]."""
    digits = digit_logits.argmax(dim=-1)
    half = digits.shape[1] // 2
    return add_digits(digits[:, :half], digits[:, half:])


def _upper_right_hull(points: np.ndarray) -> np.ndarray:
    """Indices of the points [K, 2] (non-negative) that maximise w . p for some w >= 0, w != 0: the
    vertices of their convex hull's upper-right chain, from the largest first coordinate to the largest
    second one (ties and points on a segment between two kept ones are dropped: they never win alone)."""
    order = np.lexsort((-points[:, 1], -points[:, 0]))  # first coordinate down, ties: second down
    kept: list[int] = []
    best_second = -1.0
    for index in order:
        x, y = points[index]
        if y <= best_second:
            continue  # dominated: another point is as large in both coordinates
        best_second = y
        while len(kept) >= 2:
            (x1, y1), (x2, y2) = points[kept[-2]], points[kept[-1]]
            # kept[-1] stays only if the chain turns left there (it is then above the segment).
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) > 0:
                break
            kept.pop()
        kept.append(int(index))
    return np.array(kept, dtype=np.int64)


def _digit_transitions(pair_probs: np.ndarray) -> np.ndarray:
    """[10 (sum digit o), 2 (c), 2 (c')]: P(t = o - c + 10 c') for one position's pair-sum probs [19]."""
    transitions = np.zeros((NUM_DIGITS, 2, 2))
    for digit in range(NUM_DIGITS):
        for carry_in in range(2):
            for carry_out in range(2):
                needed = digit - carry_in + 10 * carry_out
                if 0 <= needed < NUM_SUMS:
                    transitions[digit, carry_in, carry_out] = pair_probs[needed]
    return transitions


def map_sum(pair_probs: np.ndarray) -> tuple[list[int], float, int]:
    """The most probable sum under the exact distribution, for one example's pair-sum probabilities
    [N, 19] (least significant position first): (its digits, most significant first, N + 1 of them; its
    probability; the most prefixes kept at any position).

    Exact, without enumerating sums: the forward pass runs over prefixes of the sum's digits (least
    significant first), each with its vector alpha = (P(prefix, carry 0 out), P(prefix, carry 1 out)).
    Any completion of a prefix gives P(sum) = w . alpha for a w >= 0 that depends on the completion
    only (products of non-negative transition matrices), so the best sum's prefix is a vertex of the
    upper-right convex hull of the prefixes' alphas; only those are kept (`_upper_right_hull`), which is
    why the pass stays small. Each position's vectors are rescaled by their largest entry (the hull does
    not change under a common positive scale), so nothing underflows at large N.
    """
    prefixes: list[list[int]] = [[]]
    alphas = np.array([[1.0, 0.0]])
    widest, log_scale = 1, 0.0
    for position in range(pair_probs.shape[0]):
        transitions = _digit_transitions(pair_probs[position])
        children = np.einsum("kc,ocd->kod", alphas, transitions).reshape(-1, 2)  # [K * 10, 2]
        kept = _upper_right_hull(children)
        scale = children[kept].max()
        alphas = children[kept] / scale
        log_scale += float(np.log(scale))
        prefixes = [prefixes[index // NUM_DIGITS] + [index % NUM_DIGITS] for index in kept]
        widest = max(widest, len(kept))
    # The last carry is the sum's top digit: the best sum ends each prefix with its better carry.
    flat = int(alphas.argmax())
    best, top = divmod(flat, 2)
    digits = [top, *prefixes[best][::-1]]
    return digits, float(np.exp(np.log(alphas[best, top]) + log_scale)), widest


def map_sums(pair_log_probs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`map_sum` for every example of pair-sum log-probabilities [B, N, 19]: (the most probable sums as
    digits [B, N + 1], most significant first; the most prefixes kept at any position of any example)."""
    probs = pair_log_probs.detach().double().exp().cpu().numpy()
    results = [map_sum(example) for example in probs]
    digits = torch.tensor([digits for digits, _, _ in results], dtype=torch.long)
    return digits.to(pair_log_probs.device), max((widest for _, _, widest in results), default=0)
