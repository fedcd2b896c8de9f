"""data.heldout_pairs: held-out (digit, number) pairs never reach training or validation, and the test
reports the sum accuracy on seen and unseen pairs apart, in training's and scripts/eval.py's metrics."""

import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from mnist_adder.data import MnistSumDataModule
from mnist_adder.data.batches import TrainBatches, make_batch
from mnist_adder.errors import UserError
from mnist_adder.heldout import HELDOUT_PRESETS, ONE_PER_SUM, RANDOM25, heldout_sums, heldout_table
from mnist_adder.reporting.report import build_report
from mnist_adder.training.module import DigitSumModule
from mnist_adder.training.train import train

from conftest import NO_DETECTOR, make_dm

ROOT = Path(__file__).resolve().parents[1]
SEEN, UNSEEN = "test/sum_acc_seen_pairs", "test/sum_acc_unseen_pairs"
UNSEEN_SUMS = "test/sum_acc_unseen_sums"


def pairs_of(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(digits, numbers) of every sample a loader yields in one pass."""
    batches = list(loader)
    return torch.cat([b[2] for b in batches]), torch.cat([b[1].argmax(1) for b in batches])


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_the_preset_holds_out_one_pair_per_sum_and_leaves_every_digit_numbers():
    assert sorted(d + n for d, n in ONE_PER_SUM) == list(range(19))
    table = heldout_table("one_per_sum")
    assert int(table.sum()) == 19 and (~table).sum(dim=1).min() >= 8
    assert heldout_table(None) is None and heldout_table([]) is None


def partners(pairs) -> tuple[list[int], list[int]]:
    """How many numbers each digit keeps, and how many digits each number keeps."""
    table = ~heldout_table(pairs)
    return table.sum(dim=1).tolist(), table.sum(dim=0).tolist()


def draw_random_pairs(count: int = 25, seed: int = 25, min_partners: int = 5) -> list[tuple[int, int]]:
    """How RANDOM25 was drawn: `count` of the 100 pairs at random, drawn again until every digit and every
    number keeps at least `min_partners` partners (Python's random, stable across versions)."""
    rng = random.Random(seed)
    every_pair = [(digit, number) for digit in range(10) for number in range(10)]
    while True:
        pairs = sorted(rng.sample(every_pair, count))
        digits_keep, numbers_keep = partners(pairs)
        if min(digits_keep + numbers_keep) >= min_partners:
            return pairs


def test_random25_is_the_seeded_draw_and_every_digit_and_number_keeps_five_partners():
    assert list(RANDOM25) == draw_random_pairs()
    assert len(set(RANDOM25)) == 25
    digits_keep, numbers_keep = partners(RANDOM25)
    assert min(digits_keep) >= 5 and min(numbers_keep) >= 5
    assert not heldout_sums(heldout_table("random25")).any()  # every sum keeps a pair


def test_high_sums_composes_and_holds_out_exactly_the_sums_15_to_18(make_cfg, tiny_mnist):
    cfg = make_cfg(["data.heldout_pairs=high_sums"])
    table = heldout_table(cfg.data.heldout_pairs)
    assert {d + n for d, n in zip(*table.nonzero().T.tolist(), strict=True)} == {15, 16, 17, 18}
    assert int(table.sum()) == 4 + 3 + 2 + 1  # every pair of those sums, no other
    assert heldout_sums(table).nonzero().flatten().tolist() == [15, 16, 17, 18]
    dm = make_dm(tiny_mnist, heldout_pairs="high_sums")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        digits, numbers = pairs_of(loader)
        assert (digits + numbers).max() == 14  # the highest sum training and validation show
    test_digits, test_numbers = pairs_of(dm.test_dataloader())
    assert (test_digits + test_numbers >= 15).any()  # the test keeps them: they are what is measured


@pytest.mark.parametrize("preset", HELDOUT_PRESETS)
def test_every_preset_leaves_every_digit_and_number_a_partner(preset):
    digits_keep, numbers_keep = partners(preset)
    assert min(digits_keep) >= 5 and min(numbers_keep) >= 5


def test_unseen_sums_are_reported_only_when_a_whole_sum_is_held_out():
    module = DigitSumModule(PredictsFromPixels(), optimizer=torch.optim.SGD)
    # (digit, number, predicted sum): with high_sums, 9 + 8 and 8 + 9 are unseen pairs of an unseen
    # sum; random25 holds out (8, 6) of these, and no whole sum.
    samples = [(9, 8, 17), (8, 9, 16), (8, 6, 14), (1, 1, 2)]
    digits, numbers, predicted = (torch.tensor(column) for column in zip(*samples, strict=True))
    images = torch.zeros(len(samples), 1, 28, 28)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = digits.float(), predicted.float()
    for pairs, expected in [
        ("high_sums", {"seen_pairs": 1.0, "unseen_pairs": 0.5, "unseen_sums": 0.5}),
        ("random25", {"seen_pairs": 2 / 3, "unseen_pairs": 1.0}),
    ]:
        module.set_heldout_table(heldout_table(pairs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer only warns
            module._step(make_batch(images, digits, numbers), "test")
        results = {k: float(v) for k, v in module.heldout_results().items()}
        assert results == {f"test/sum_acc_{name}": pytest.approx(v) for name, v in expected.items()}
        module.heldout_pair_metrics.reset()


def test_training_and_validation_never_see_a_heldout_pair(tiny_mnist):
    pairs = [[3, 4], [7, 2], [0, 9], [5, 0], [5, 1], [5, 2], [5, 3], [5, 4], [5, 5], [5, 6], [5, 7], [5, 8]]
    dm = make_dm(tiny_mnist, heldout_pairs=pairs)
    table = heldout_table(pairs)
    train = dm.train_dataloader()
    epochs = [pairs_of(train) for _ in range(5)]  # without a Trainer each pass is the next epoch
    for digits, numbers in epochs:
        assert not table[digits, numbers].any()
        assert set(numbers[digits == 5].tolist()) == {9}  # digit 5 keeps a single number: it gets it
    assert not torch.equal(epochs[0][1], epochs[1][1])  # still drawn afresh each epoch
    val_digits, val_numbers = pairs_of(dm.val_dataloader())
    assert not table[val_digits, val_numbers].any()
    # The test keeps its fixed pairs, held-out ones included: they are what the unseen accuracy is about.
    test_pairs = pairs_of(dm.test_dataloader())
    plain_test_pairs = pairs_of(make_dm(tiny_mnist).test_dataloader())
    assert all(torch.equal(a, b) for a, b in zip(test_pairs, plain_test_pairs, strict=True))
    assert table[test_pairs].any()


def test_real_mnist_numbers_stay_uniform_over_the_allowed_ones(real_data_dir):
    dm = MnistSumDataModule(data_dir=real_data_dir, download=False, heldout_pairs="one_per_sum")
    dm.setup("fit")
    table = heldout_table("one_per_sum")
    train = dm.train_dataloader()
    labels = train.labels
    plain = TrainBatches(train.images, labels, batch_size=256, seed=dm.seed)
    counts = torch.zeros(10, 10)
    for epoch in range(3):
        numbers = train.epoch_order(epoch)[1]
        assert not table[labels, numbers].any()
        counts.index_put_((labels, numbers), torch.ones(len(labels)), accumulate=True)
        # Re-drawn, not drawn anew: the samples whose first draw was allowed keep it.
        plain_numbers = plain.epoch_order(epoch)[1]
        kept = ~table[labels, plain_numbers]
        assert torch.equal(numbers[kept], plain_numbers[kept])
    allowed = counts[~table]
    per_digit_mean = (counts.sum(dim=1, keepdim=True) / (~table).sum(dim=1, keepdim=True)).expand(10, 10)
    # About 2,000 draws per allowed pair: a uniform draw stays within 10 % of its digit's mean
    # (4.5 standard deviations); a draw that favoured some numbers, or missed one, would not.
    assert ((allowed / per_digit_mean[~table]) - 1).abs().max() < 0.10
    val_digits, val_numbers = pairs_of(dm.val_dataloader())
    assert not table[val_digits, val_numbers].any()


def test_a_resumed_pass_sees_the_same_numbers(tiny_mnist):
    # The numbers come from (seed, epoch) alone, held-out pairs or not: a resume mid-epoch continues exactly.
    dm = make_dm(tiny_mnist, heldout_pairs="one_per_sum")
    uninterrupted = dm.train_dataloader()
    for _ in range(2):
        list(uninterrupted)
    expected = list(uninterrupted)[3:]  # epoch 2 from its fourth batch
    resumed = make_dm(tiny_mnist, heldout_pairs="one_per_sum").train_dataloader()
    resumed.load_state_dict({"epoch": 2, "batches_done": 3})
    got = list(resumed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class PredictsFromPixels(nn.Module):
    """Predicts the digit and sum written in the first two pixels of each image: a hand-made model."""

    def forward(self, image: torch.Tensor, number_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        digit, total = image[:, 0, 0, 0].long(), image[:, 0, 0, 1].long()
        return F.one_hot(digit, 10).float() * 10, F.one_hot(total, 19).float() * 10


def test_seen_and_unseen_sum_accuracy_on_a_hand_made_case():
    # (digit, number, predicted sum): held out are (3,4) and (7,2), not their mirrors (4,3) and (2,7).
    samples = [
        (3, 4, 7),  # unseen, right
        (3, 4, 8),  # unseen, wrong
        (7, 2, 9),  # unseen, right
        (4, 3, 7),  # seen, right
        (2, 7, 0),  # seen, wrong
        (0, 0, 0),  # seen, right
        (5, 5, 1),  # seen, wrong
    ]
    digits, numbers, predicted = (torch.tensor(column) for column in zip(*samples, strict=True))
    images = torch.zeros(len(samples), 1, 28, 28)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = digits.float(), predicted.float()
    module = DigitSumModule(PredictsFromPixels(), optimizer=torch.optim.SGD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer only warns
        module._step(make_batch(images, digits, numbers), "test")  # no held-out pairs: no split counted
        assert not module.heldout_pair_metrics.totals.any()
        module.set_heldout_table(heldout_table([[3, 4], [7, 2]]))
        for part in (slice(0, 4), slice(4, 7)):  # accumulated over batches
            module._step(make_batch(images[part], digits[part], numbers[part]), "test")
    result = module.heldout_pair_metrics.compute()
    assert float(result["sum_acc_unseen_pairs"]) == pytest.approx(2 / 3)
    assert float(result["sum_acc_seen_pairs"]) == pytest.approx(2 / 4)
    module.heldout_pair_metrics.reset()
    none = torch.tensor([False, False])
    module.heldout_pair_metrics.update(torch.tensor([True, False]), none, none)
    assert torch.isnan(module.heldout_pair_metrics.compute()["sum_acc_unseen_pairs"])  # none: no number


ALL_OF_3 = ",".join(f"[3,{n}]" for n in range(10))
ALL_WITH_3 = ",".join(f"[{d},3]" for d in range(10))
# (override, the value as the message names it, what the message says is allowed)
BAD = [
    ("data.heldout_pairs=one_per_digit", "'one_per_digit'", "unknown preset"),
    ("data.heldout_pairs=[3,4]", "[3, 4]", "[digit, number] pairs"),
    ("data.heldout_pairs=[[3,10]]", "[[3, 10]]", "both in 0..9"),
    ("data.heldout_pairs=[[3,4,5]]", "[[3, 4, 5]]", "[digit, number] pairs"),
    (f"data.heldout_pairs=[{ALL_OF_3}]", "[[3, 0], [3, 1]", "all 10 numbers of digit 3"),
    (f"data.heldout_pairs=[{ALL_WITH_3}]", "[[0, 3], [1, 3]", "all 10 digits of number 3"),
]


@pytest.mark.parametrize("override,named,allowed", BAD, ids=[b[2] for b in BAD])
def test_bad_heldout_pairs_are_one_line_naming_what_is_allowed(make_cfg, tmp_path, override, named, allowed):
    with pytest.raises(UserError) as err:
        train(make_cfg([override]))  # stops at the config check, before data, model or trainer
    message = str(err.value)
    assert f"data.heldout_pairs={named}" in message and allowed in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_bad_heldout_pairs_through_the_train_script(tmp_path):
    # One case through the command line (each start costs seconds): exit 2, one error line, no traceback.
    override, _, allowed = BAD[-1]
    result = run_script("scripts/train.py", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "data.heldout_pairs=" in errors[0] and allowed in errors[0], errors[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_a_run_without_heldout_pairs_reports_no_split(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert "test/sum_acc" in metrics and SEEN not in metrics and UNSEEN not in metrics


# One short real run per adder on real MNIST with one pair per sum held out (19 pairs, and so the sums
# 0 and 18): experiment=fast for one epoch of 25 steps of 512 images, the cheapest setting found in which
# the contrast is clear. Measured (seed 1; conv also seeds 2, 3): seen / unseen pairs mlp 87.4 / 0.0 %,
# shift 95.1 / 95.7 %, conv 95.8 / 96.2, 96.9 / 97.6 and 97.0 / 97.3 %. With 15 steps mlp's seen pairs
# fell to 54 %. The floors catch a broken pipeline or mechanism, not noise.
# "default" is model=small as a new user gets it, with no adder named: conv since issue 33, so this run
# fails if the default goes back to an adder that memorises.
ADDER_SEEN_FLOOR = {"mlp": 0.70, "shift": 0.90, "default": 0.90}
# How far the adders that add may score below (or above) their seen pairs on unseen ones (points / 100).
UNSEEN_TOLERANCE = 0.03
# What an adder that memorised the pairs scores on the unseen ones: about nothing (0 of 1,926 measured).
MEMORISED_CEILING = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("adder", ["mlp", "shift", "default"])
def test_a_real_run_and_eval_report_seen_and_unseen_pairs(real_data_dir, tmp_path, adder):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    train = run_script(
        "scripts/train.py",
        f"paths.data_dir={real_data_dir}",
        f"hydra.run.dir={run_dir}",
        "experiment=fast",  # weight averaging off: it would score near-initial weights after 25 steps
        *([] if adder == "default" else [f"model/adder={adder}"]),
        "data.heldout_pairs=one_per_sum",
        "trainer.max_epochs=1",
        *NO_DETECTOR,
        "trainer.limit_train_batches=25",
        "trainer.check_val_every_n_epoch=1",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "seed=1",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert trained[SEEN] >= ADDER_SEEN_FLOOR[adder], trained
    if adder == "mlp":  # it learned a table of the pairs it saw: none of the others, no unseen sum
        assert trained[UNSEEN] <= MEMORISED_CEILING and trained[UNSEEN_SUMS] <= MEMORISED_CEILING, trained
    else:  # it adds: pairs and sums it never saw as well as the others
        assert abs(trained[UNSEEN] - trained[SEEN]) <= UNSEEN_TOLERANCE, trained
        assert trained[UNSEEN_SUMS] >= trained[SEEN] - 2 * UNSEEN_TOLERANCE, trained
    assert "test/sum_acc_unseen_pairs" in train.stdout  # in the printed table
    # The two groups partition the 10,000 test samples: their accuracies average back to the sum accuracy.
    dm = make_dm(real_data_dir, heldout_pairs="one_per_sum")
    test_digits, test_numbers = pairs_of(dm.test_dataloader())
    n_unseen = int(dm.heldout_table[test_digits, test_numbers].sum())
    assert 1000 < n_unseen < 3000  # about 19 of the 100 pairs
    mixed = (trained[SEEN] * (10_000 - n_unseen) + trained[UNSEEN] * n_unseen) / 10_000
    assert mixed == pytest.approx(trained["test/sum_acc"], abs=1e-5)
    scalars = EventAccumulator(str(run_dir / "tensorboard")).Reload().Tags()["scalars"]
    assert SEEN in scalars and UNSEEN in scalars

    # scripts/eval.py takes the held-out pairs from the checkpoint's stored config: the same numbers.
    evaluated = run_script(
        "scripts/eval.py",
        f"ckpt_path={trained['ckpt_path']}",
        f"paths.data_dir={real_data_dir}",
        f"hydra.run.dir={eval_dir}",
        "trainer.enable_progress_bar=false",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((eval_dir / "metrics.json").read_text())
    for key in (SEEN, UNSEEN, UNSEEN_SUMS, "test/sum_acc", "test/sum_coherence_gap"):
        assert again[key] == trained[key], key

    # scripts/report.py shows the columns for such runs.
    report, _ = build_report([run_dir])
    for title in ("sum seen pairs %", "sum unseen pairs %", "sum unseen sums %", "coherence gap %"):
        assert title in report, title
    assert f"{100 * trained[UNSEEN]:.2f}" in report and f"{100 * trained[UNSEEN_SUMS]:.2f}" in report


def test_the_report_has_no_pair_columns_for_runs_without_them(tmp_path):
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (job / "metrics.json").write_text(json.dumps({"test/digit_acc": 0.99, "test/sum_acc": 0.98, "seed": 1}))
    report, _ = build_report([tmp_path])
    assert "| 99.00 | 98.00 |" in report and "pairs %" not in report and "sums %" not in report
