"""MNIST addition (data=mnist_addition): the exact sum of two N-digit numbers against brute force, the
most probable sum, the protocol's datamodule, bad input, and a real run whose digits are learned from
sums alone."""

import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import PropertyMock, patch

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_bad_input import assert_one_clear_line, run_cli

from mnist_adder.config_checks import check_config, setting_for_digits
from mnist_adder.data.mnist_addition import MnistAdditionDataModule
from mnist_adder.digit_numbers import add_digits
from mnist_adder.errors import UserError
from mnist_adder.models import ConvBackbone, DigitSumNet, LeNet, MLPAdder
from mnist_adder.models.adders import ShiftConvolution
from mnist_adder.models.number_sum import (
    NumberSumNet,
    argmax_digit_sum,
    carry_chain_log_prob,
    map_sum,
    pair_sum_log_probs,
)
from mnist_adder.training import train as train_module
from mnist_adder.training.addition_module import NumberAdditionModule
from mnist_adder.training.module import DigitSumModule
from mnist_adder.training.task import TaskModule
from mnist_adder.training.train import train

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]


def sum_as_digits(values: torch.Tensor, digits: int) -> torch.Tensor:
    """Integers [K] -> their N + 1 digits [K, N + 1], most significant first."""
    return torch.stack([(values // 10**k) % 10 for k in range(digits, -1, -1)], dim=1)


def hand_made_logits(digits: int, seed: int) -> torch.Tensor:
    """[4, 2N, 10] digit logits: near-uniform, peaked, mixed and one of two-way ties per image, so that
    the carry chain meets every kind of carry (always, never, uncertain)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.3, 6.0, 2.0, 1.0])[:, None, None]
    logits = torch.randn(4, 2 * digits, 10, generator=generator, dtype=torch.float64) * scales
    logits[3, :, :] = -20.0
    logits[3, :, 9], logits[3, :, 1] = 0.0, 0.0  # 9 or 1, equally: sums with and without carries
    return logits


def brute_force_sum_probs(logits: torch.Tensor, digits: int) -> torch.Tensor:
    """P(sum) [B, 2 * 10^N - 1] over all 10^(2N) digit combinations, without the carry chain: each
    number's distribution over its 10^N values (the product of its digits' probabilities, every digit
    string enumerated by the Kronecker product), and every pair of values added (their convolution)."""
    probs = logits.double().softmax(dim=-1).numpy()
    out = []
    for example in probs:
        numbers = []
        for digit_probs in (example[:digits], example[digits:]):
            values = np.ones(1)
            for position in digit_probs:  # most significant first: value = 10 * value + digit
                values = np.kron(values, position)
            numbers.append(values)
        out.append(np.convolve(*numbers))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_carry_chain_equals_brute_force_enumeration(digits):
    logits = hand_made_logits(digits, seed=digits)
    expected = brute_force_sum_probs(logits, digits)
    pair = pair_sum_log_probs(logits, ShiftConvolution())  # [B, N, 19]
    all_sums = torch.arange(expected.shape[1])
    for example in range(len(logits)):
        chain = pair[example : example + 1].expand(len(all_sums), -1, -1)
        got = carry_chain_log_prob(chain, sum_as_digits(all_sums, digits)).double().exp()
        # float32 inside (the shift convolution's precision); every sum's probability to 1e-6.
        assert torch.allclose(got, expected[example], atol=1e-6), (digits, example)
        assert math.isclose(float(got.sum()), 1.0, abs_tol=1e-5)


def test_a_sum_no_pair_of_numbers_can_make_has_no_probability():
    pair = pair_sum_log_probs(hand_made_logits(2, seed=0), ShiftConvolution())
    # 2 * 99 = 198 is the largest; "2xx" has a top digit no carry can give.
    impossible = torch.tensor([[2, 0, 0]] * 4)
    assert (carry_chain_log_prob(pair, impossible).exp() < 1e-30).all()


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_the_map_sum_is_the_most_probable_sum(digits):
    differs = 0
    for seed in range(6):
        logits = hand_made_logits(digits, seed=10 * digits + seed)
        expected = brute_force_sum_probs(logits, digits)
        pair_probs = pair_sum_log_probs(logits, ShiftConvolution()).double().exp().numpy()
        for example in range(len(logits)):
            decoded, probability, _ = map_sum(pair_probs[example])
            assert len(decoded) == digits + 1
            value = int("".join(map(str, decoded)))
            best = float(expected[example].max())
            # The decoded sum is a most probable one (ties: any of them), and its probability is its own.
            assert math.isclose(float(expected[example, value]), best, rel_tol=1e-5), (digits, seed, example)
            assert math.isclose(probability, best, rel_tol=1e-5)
            argmax_sum = int("".join(map(str, argmax_digit_sum(logits[example : example + 1])[0].tolist())))
            differs += value != argmax_sum
    # The test means something: on these distributions the MAP sum is not always the digits' sum.
    assert differs > 0


def test_the_map_sum_at_100_digits_beats_the_digits_sum_and_stays_small():
    logits = torch.randn(1, 200, 10, generator=torch.Generator().manual_seed(0)) * 3
    pair = pair_sum_log_probs(logits, ShiftConvolution())
    decoded, _, widest = map_sum(pair[0].double().exp().numpy())
    chain = carry_chain_log_prob(
        pair.expand(2, -1, -1), torch.tensor([decoded, argmax_digit_sum(logits)[0].tolist()])
    )
    assert len(decoded) == 101 and chain[0] >= chain[1] - 1e-4
    assert widest < 50  # the exact search keeps a handful of prefixes per position, not 10^N


# ---- the loss: exact, with its true gradient, where the digits are read confidently wrong ----------


def confidently_wrong_logits(true_digits: torch.Tensor, margin: float) -> torch.Tensor:
    """[B, 2N, 10] float64 logits that read every digit d as its neighbour (d + 1) mod 10, `margin` above
    every other digit, d included: the default backbone's collapse at seed 1 (issue 34)."""
    return margin * torch.nn.functional.one_hot((true_digits + 1) % 10, 10).double()


def true_sum_of(true_digits: torch.Tensor) -> torch.Tensor:
    """The sum's digits [B, N + 1] of the two numbers whose digits are [B, 2N]."""
    half = true_digits.shape[1] // 2
    return add_digits(true_digits[:, :half], true_digits[:, half:])


def brute_force_log_prob(logits: torch.Tensor, sum_digits: torch.Tensor) -> torch.Tensor:
    """log P(sum) [B] in float64 from every digit combination, differentiable: each number's distribution
    over its 10^N values (the Kronecker product of its digits' softmax, most significant first), then
    P(S) = sum_x P(first = x) P(second = S - x)."""
    digits = logits.shape[1] // 2
    probs = logits.double().softmax(dim=-1)
    out = []
    for example, sum_row in zip(probs, sum_digits, strict=True):
        first, second = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        for position in range(digits):
            first = torch.kron(first, example[position])
            second = torch.kron(second, example[digits + position])
        total = int("".join(map(str, sum_row.tolist())))
        values = torch.arange(max(0, total - 10**digits + 1), min(total, 10**digits - 1) + 1)
        out.append((first[values] * second[total - values]).sum().log())
    return torch.stack(out)


def reference_log_prob(logits: torch.Tensor, sum_digits: torch.Tensor) -> torch.Tensor:
    """log P(sum) [B] in float64, the same carry chain written again plainly (-inf for log 0, no
    gradient needed): what the float32 code should give at any N."""
    digits = logits.shape[1] // 2
    log_probs = logits.double().log_softmax(dim=-1)
    first, second = log_probs[:, :digits].flip(1), log_probs[:, digits:].flip(1)  # least significant first
    pair = torch.full((len(logits), digits, 19), -math.inf, dtype=torch.float64)
    for a in range(10):
        for b in range(10):
            pair[:, :, a + b] = torch.logaddexp(pair[:, :, a + b], first[:, :, a] + second[:, :, b])
    low_first, rows = sum_digits.flip(1), torch.arange(len(logits))
    alpha = torch.tensor([0.0, -math.inf], dtype=torch.float64).expand(len(logits), 2)
    for position in range(digits):
        following = torch.full_like(alpha, -math.inf)
        for carry in range(2):
            for carry_out in range(2):
                needed = low_first[:, position] - carry + 10 * carry_out
                impossible = (needed < 0) | (needed > 18)
                term = pair[rows, position, needed.clamp(0, 18)].masked_fill(impossible, -math.inf)
                following[:, carry_out] = torch.logaddexp(following[:, carry_out], alpha[:, carry] + term)
        alpha = following
    return alpha[rows, sum_digits[:, 0].clamp(0, 1)].masked_fill(sum_digits[:, 0] > 1, -math.inf)


def model_log_prob(logits: torch.Tensor, sum_digits: torch.Tensor) -> torch.Tensor:
    """log P(sum) [B] as the training loss computes it (float32)."""
    return carry_chain_log_prob(pair_sum_log_probs(logits, ShiftConvolution()), sum_digits)


@pytest.mark.parametrize("margin", [10, 20, 30, 40])
@pytest.mark.parametrize("digits", [1, 2, 3])
def test_the_loss_and_its_gradient_are_exact_where_digits_are_read_confidently_wrong(digits, margin):
    # Every digit read as its neighbour: the true sum's log P is about -margin per position, below the
    # adders' floor of -30 from margin 30 on; a floor there would give those images no gradient at all.
    true_digits = torch.randint(0, 10, (16, 2 * digits), generator=torch.Generator().manual_seed(digits))
    sums = true_sum_of(true_digits)
    reference_logits = confidently_wrong_logits(true_digits, margin).requires_grad_(True)
    expected = brute_force_log_prob(reference_logits, sums)
    (-expected.sum()).backward()
    logits = reference_logits.detach().float().requires_grad_(True)
    got = model_log_prob(logits, sums)
    (-got.sum()).backward()
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=0), (got, expected)
    scale = float(reference_logits.grad.abs().max())
    assert torch.allclose(logits.grad.double(), reference_logits.grad, rtol=0, atol=1e-5 * scale)
    assert (logits.grad.abs().amax(dim=-1) > 0).all()  # every image hears from the loss


def test_the_loss_at_100_digits_is_finite_and_matches_float64():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 200, 10, generator=generator) * 30).requires_grad_(True)
    true_digits = torch.randint(0, 10, (8, 200), generator=generator)
    for sums in (true_sum_of(true_digits), true_sum_of(logits.argmax(dim=-1))):
        got = model_log_prob(logits, sums)
        loss = -got.mean()
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        # Thousands of nats for the true digits' sums: float32 keeps them to a few parts in 10^7.
        assert torch.allclose(got.double(), reference_log_prob(logits.detach(), sums), rtol=1e-5, atol=1e-4)


def test_a_true_sum_far_below_minus_ten_thousand_nats_is_not_taken_for_log_0():
    # 100 positions at about -150 nats each: log P about -1.5e4, below what an unreachable carry stood
    # for before (-1e4), where that fake path outweighed the real one.
    true_digits = torch.randint(0, 10, (4, 200), generator=torch.Generator().manual_seed(1))
    sums = true_sum_of(true_digits)
    logits = confidently_wrong_logits(true_digits, 150).float().requires_grad_(True)
    got = model_log_prob(logits, sums)
    (grad,) = torch.autograd.grad(-got.sum(), logits)
    expected = reference_log_prob(logits.detach(), sums)
    assert (expected < -1.0e4).all()
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=0) and torch.isfinite(grad).all()


def test_add_digits_is_integer_addition():
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, 10, (50, 4), generator=generator) for _ in range(2))
    as_int = lambda d: (d * 10 ** torch.arange(d.shape[1] - 1, -1, -1)).sum(dim=1)  # noqa: E731
    assert torch.equal(add_digits(first, second), sum_as_digits(as_int(first) + as_int(second), 4))


def test_lenet_is_the_papers_network():
    net = LeNet()
    assert sum(p.numel() for p in net.parameters()) == 44_426
    image = torch.zeros(3, 1, 28, 28)
    features, logits = net.features_and_logits(image)
    assert logits.shape == (3, 10) and torch.equal(logits, net(image))
    assert [f.shape[1:] for f in features] == [(6, 12, 12), (84,)]


# ---- the datamodule ------------------------------------------------------------------------------


def make_addition_dm(data_dir, digits: int = 2, seed: int = 3) -> MnistAdditionDataModule:
    dm = MnistAdditionDataModule(
        data_dir=data_dir,
        digits=digits,
        batch_size=40,
        eval_batch_size=40,
        val_size=60,
        download=False,
        seed=seed,
    )
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_the_protocol_cuts_examples_of_2n_images_labelled_by_their_sum(tiny_mnist):
    dm = make_addition_dm(tiny_mnist, digits=2)  # 400 training images: 340 train, 60 val; 120 test
    assert (dm.num_examples("train"), dm.num_examples("val"), dm.num_examples("test")) == (85, 15, 30)
    images, labels, sums = dm.examples("test")
    assert images.shape == (30, 4, 1, 28, 28) and labels.shape == (30, 4) and sums.shape == (30, 3)
    as_int = lambda d: d[:, 0] * 10 + d[:, 1]  # noqa: E731
    assert torch.equal(sum_as_digits(as_int(labels[:, :2]) + as_int(labels[:, 2:]), 2), sums)
    # Every image of a split in at most one example.
    train_images = dm.examples("train")[0].flatten(0, 1).flatten(1)
    assert len(torch.unique(train_images, dim=0)) == 340


def test_training_batches_hold_no_digit_label(tiny_mnist):
    dm = make_addition_dm(tiny_mnist, digits=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 8  # 40 images per step: 10 examples of 4
    for batch in batches:
        assert len(batch) == 2  # (images, sums): nothing else can reach the loss
        images, sums = batch
        assert images.shape == (10, 4, 1, 28, 28) and sums.shape == (10, 3)


def test_no_digit_label_reaches_the_loss(tiny_mnist):
    dm = make_addition_dm(tiny_mnist, digits=2)
    images, sums, labels = next(iter(dm.test_dataloader()))
    module = NumberAdditionModule(NumberSumNet(LeNet()), optimizer=torch.optim.SGD)
    losses, grads = [], []
    for digit_labels in (labels, torch.randint(0, 10, labels.shape)):  # the true labels, then random
        module.zero_grad()
        loss = module._step((images, sums, digit_labels), "val")[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    with pytest.raises(ValueError, match="digit_weight must be 0"):
        NumberAdditionModule(NumberSumNet(LeNet()), optimizer=torch.optim.SGD, digit_weight=1.0)


@pytest.mark.parametrize("done", [0.0, 0.25, 1.0])
def test_the_entropy_term_is_subtracted_from_the_exact_loss_and_fades_to_nothing(tiny_mnist, done):
    dm = make_addition_dm(tiny_mnist, digits=2)
    images, sums = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    module = NumberAdditionModule(NumberSumNet(LeNet()), optimizer=torch.optim.SGD, entropy_weight=0.3)
    trainer = SimpleNamespace(estimated_stepping_batches=100)  # the two things the step reads of it
    with (
        patch.object(NumberAdditionModule, "trainer", new_callable=PropertyMock, return_value=trainer),
        patch.object(
            NumberAdditionModule, "global_step", new_callable=PropertyMock, return_value=int(100 * done)
        ),
        patch.object(NumberAdditionModule, "log"),
    ):
        loss = module._step((images, sums), "train")[0]
    digit_logits = module(images)
    exact = -module.net.sum_log_prob(digit_logits, sums).mean()
    probs = digit_logits.softmax(dim=-1)
    entropy = -(probs * probs.log()).sum(dim=-1).sum(dim=1).mean()  # of an example's 2N digits
    assert torch.allclose(loss, exact - 0.3 * (1 - done) * entropy, atol=1e-5)
    with pytest.raises(ValueError, match="entropy_weight must be >= 0"):
        NumberAdditionModule(NumberSumNet(LeNet()), optimizer=torch.optim.SGD, entropy_weight=-1.0)


def test_validation_and_test_are_the_same_for_every_run_and_training_is_the_seeds(tiny_mnist):
    first, second = make_addition_dm(tiny_mnist, seed=1), make_addition_dm(tiny_mnist, seed=2)
    for split in ("val", "test"):
        assert all(
            torch.equal(a, b) for a, b in zip(first.examples(split), second.examples(split), strict=True)
        )
    assert not torch.equal(first.examples("train")[1], second.examples("train")[1])
    again = make_addition_dm(tiny_mnist, seed=1)
    assert torch.equal(first.examples("train")[0], again.examples("train")[0])


def test_examples_per_step_sets_the_training_batch_whatever_the_images_per_batch(tiny_mnist):
    dm = MnistAdditionDataModule(
        data_dir=tiny_mnist, digits=2, batch_size=40, examples_per_step=7, val_size=60, download=False
    )
    dm.setup("fit")
    images, sums = next(iter(dm.train_dataloader()))
    assert images.shape[:2] == (7, 4) and sums.shape == (7, 3)
    assert len(dm.train_dataloader()) == 85 // 7
    assert make_addition_dm(tiny_mnist, digits=2).batch_size == 40 // 4  # without it: images // 2N


# ---- the per-N schedule --------------------------------------------------------------------------


def schedule_rows() -> dict[int, dict]:
    config = OmegaConf.load(ROOT / "conf" / "data" / "mnist_addition.yaml")
    return {int(n): dict(row) for n, row in config.addition_schedule.items()}


@pytest.mark.parametrize("digits", [1, 2, 3, 4, 9, 15, 99, 100, 1000])
def test_each_n_trains_with_its_schedule_row_or_the_row_of_the_largest_n_below_it(make_cfg, digits):
    rows = schedule_rows()
    row = rows[max(n for n in rows if n <= digits)]
    cfg = make_cfg(["data=mnist_addition", f"data.digits={digits}"])
    assert cfg.data.examples_per_step == row["examples_per_step"]
    assert cfg.model.optimizer.lr == row["lr"] and cfg.model.scheduler.max_lr == row["lr"]
    assert cfg.model.scheduler.pct_start == row["warmup"] and cfg.trainer.max_epochs == row["epochs"]
    assert cfg.model.entropy_weight == row["entropy"]
    assert setting_for_digits(rows, digits, "lr") == row["lr"]


def test_the_command_line_wins_over_the_schedule(make_cfg):
    cfg = make_cfg(
        [
            "data=mnist_addition",
            "data.digits=4",
            "data.examples_per_step=3",
            "model.optimizer.lr=0.0005",
            "model.scheduler.pct_start=0.1",
            "trainer.max_epochs=2",
        ]
    )
    assert (cfg.data.examples_per_step, cfg.model.optimizer.lr, cfg.model.scheduler.max_lr) == (
        3,
        0.0005,
        0.0005,
    )
    assert (cfg.model.scheduler.pct_start, cfg.trainer.max_epochs) == (0.1, 2)


def test_an_n_below_every_row_or_no_number_takes_the_smallest_row():
    rows = {2: {"lr": 0.1}, 5: {"lr": 0.2}}
    assert [setting_for_digits(rows, n, "lr") for n in (1, 2, 4, 5, 7, "x", 2.5)] == [
        0.1,
        0.1,
        0.1,
        0.2,
        0.2,
        0.1,
        0.1,
    ]


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "two"])
def test_a_bad_number_of_digits_is_one_line(make_cfg, value):
    with pytest.raises(UserError) as err:
        check_config(make_cfg(["data=mnist_addition", f"data.digits={value}"]))
    assert str(err.value).startswith("data.digits=") and "at least 1" in str(err.value)


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "many"])
def test_a_bad_examples_per_step_is_one_line(make_cfg, value):
    with pytest.raises(UserError) as err:
        check_config(make_cfg(["data=mnist_addition", f"data.examples_per_step={value}"]))
    assert str(err.value).startswith("data.examples_per_step=") and "at least 1" in str(err.value)


def test_a_bad_number_of_digits_on_the_command_line(tmp_path):
    result = run_cli("data=mnist_addition", "data.digits=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_clear_line(result, "data.digits=0", "at least 1")


def test_the_addition_model_without_its_data_is_one_line(make_cfg):
    with pytest.raises(UserError, match="model=addition goes with data=mnist_addition only"):
        check_config(make_cfg(["model=addition"]))
    with pytest.raises(UserError, match="data=mnist_addition trains model=addition only"):
        check_config(make_cfg(["data=mnist_addition", "model=small"]))


def test_digits_that_leave_no_test_example_stop_before_training(make_cfg, tiny_mnist, tmp_path):
    # 120 test images: at most 60 digits; the 340 training and 60 validation images allow more.
    with pytest.raises(UserError) as err:
        train(
            make_cfg(
                ["data=mnist_addition", "data.digits=61", f"paths.data_dir={tiny_mnist}", "data.val_size=200"]
            )
        )
    assert "data.digits=61" in str(err.value) and "120 test images make none" in str(err.value)
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


@pytest.mark.parametrize(
    ("override", "message"),
    [("calibrate=true", "has no temperatures"), ("not_digit_accept=0.99", "has no 'not a digit' detector")],
)
def test_a_post_training_fit_the_addition_net_has_no_place_for_stops_before_training(
    make_cfg, tiny_mnist, tmp_path, override, message
):
    overrides = ["data=mnist_addition", f"paths.data_dir={tiny_mnist}", "data.val_size=60", override]
    with pytest.raises(UserError, match=f"NumberAdditionModule {message}"):
        train(make_cfg(overrides))
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_both_tasks_share_one_base_and_say_what_train_reads_of_them():
    addition = NumberAdditionModule(NumberSumNet(LeNet()), optimizer=torch.optim.SGD)
    digit_sum = DigitSumModule(DigitSumNet(ConvBackbone(), MLPAdder()), optimizer=torch.optim.SGD)
    assert isinstance(addition, TaskModule) and isinstance(digit_sum, TaskModule)
    assert not addition.has_temperatures and not addition.has_not_digit_detector
    assert digit_sum.has_temperatures and digit_sum.has_not_digit_detector
    assert addition.test_result_lists() == {} and digit_sum.temperatures() == (1.0, 1.0)
    with pytest.raises(NotImplementedError, match="NumberAdditionModule has no temperatures"):
        addition.temperatures()
    # train() reads a task through TaskModule only: it names neither task.
    source = inspect.getsource(train_module)
    assert "DigitSumModule" not in source and "NumberAdditionModule" not in source
    assert "hasattr" not in source


# ---- training ------------------------------------------------------------------------------------


def test_a_tiny_addition_run_writes_its_metrics(make_cfg, tiny_mnist, tmp_path):
    overrides = ["data=mnist_addition", "data.digits=2", f"paths.data_dir={tiny_mnist}", "data.val_size=60"]
    overrides += [
        "data.batch_size=40",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    overrides += ["model/backbone=lenet"]
    results = train(make_cfg(overrides))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test/sum_acc", "test/sum_acc_map", "test/digit_acc", "test/sum_acc_ceiling", "test/loss"):
        assert key in saved and saved[key] == results[key]
    assert math.isclose(saved["test/sum_acc_ceiling"], saved["test/digit_acc"] ** 4, rel_tol=1e-5)
    assert saved["num_parameters"] == 44_426
    assert "best_val/sum_acc" in saved and "best_val/both_acc" not in saved  # what selected the checkpoint


@pytest.mark.slow
def test_digits_are_learned_from_sums_alone_at_n_2(real_data_dir, tmp_path):
    # 80 steps of 64 examples (256 images) on real MNIST: no digit label in the loss, yet the digits
    # come out far above chance (10 %), and so do the sums (chance: about 1 in 199).
    overrides = ["data=mnist_addition", "data.digits=2", f"paths.data_dir={real_data_dir}", "seed=1"]
    overrides += [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=80",
        "trainer.enable_progress_bar=false",
    ]
    overrides += ["logger=csv", "callbacks.ema=null"]
    results = train(compose_config(overrides, tmp_path / "run"))
    assert results["test/digit_acc"] > 0.8, results
    assert results["test/sum_acc"] > 0.5 and results["test/sum_acc_map"] > 0.5, results


def test_the_addition_preset_leaves_the_other_runs_as_they_were(make_cfg):
    cfg = make_cfg()
    assert cfg.data._target_ == "mnist_adder.data.MnistSumDataModule"
    assert cfg.callbacks.model_checkpoint.monitor == "val/both_acc" and cfg.calibrate is True
    assert cfg.model.net.backbone._target_ == "mnist_adder.models.ConvBackbone"
    addition = make_cfg(["data=mnist_addition", "model/backbone=lenet"])
    assert addition.callbacks.model_checkpoint.monitor == "val/sum_acc" and addition.calibrate is False
    assert addition.model.net.backbone == {"_target_": "mnist_adder.models.LeNet"}
    assert np.isclose(addition.model.digit_weight, 0.0)


# ---- the papers' protocol (experiment=addition_protocol) -----------------------------------------


def test_without_a_validation_split_every_training_image_trains(tiny_mnist):
    dm = MnistAdditionDataModule(data_dir=tiny_mnist, digits=2, batch_size=40, val_size=0, download=False)
    dm.setup("fit")
    assert dm.num_examples("train") == 100  # all 400 training images, 4 to an example
    assert list(dm.val_dataloader()) == []


def test_the_protocol_run_hands_over_its_last_epoch_and_selects_nothing(make_cfg, tiny_mnist, tmp_path):
    overrides = ["experiment=addition_protocol", "data.digits=2", f"paths.data_dir={tiny_mnist}"]
    overrides += ["data.examples_per_step=10", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    overrides += ["model/backbone=lenet", "logger=csv"]
    train(make_cfg(overrides))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert Path(saved["ckpt_path"]).name == "epoch_001.ckpt"  # the second and last epoch's
    assert not [key for key in saved if key.startswith("best_val")]  # nothing was selected
    assert saved["test/sum_acc"] is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data=mnist_addition", "data.val_size=0"],
            "run python scripts/train.py experiment=addition_protocol",
        ),
        (["data.val_size=0"], "data.val_size=0 .*at least 1"),
        (["experiment=addition_protocol", "data.val_size=-1"], "at least 0"),
    ],
)
def test_no_validation_split_without_the_protocol_preset_is_one_line(make_cfg, overrides, message):
    with pytest.raises(UserError, match=message):
        check_config(make_cfg(overrides))
