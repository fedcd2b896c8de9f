"""scripts/curves.py: learning curves read back from real TensorBoard event files."""

import pytest

from mnist_adder.errors import UserError
from mnist_adder.reporting.curves import curves_table, read_scalars


@pytest.mark.slow
def test_curves_of_a_real_run(trained_run):
    digit = read_scalars(trained_run, "val/digit_acc")
    assert len(digit) == 2 and all(0.5 < value <= 1.0 for value in digit.values())  # two epochs
    table = curves_table([trained_run, trained_run], ["val/digit_acc", "val/sum_acc"], ["a", "b"])
    lines = table.splitlines()
    assert lines[0] == "| step | a val/digit_acc | a val/sum_acc | b val/digit_acc | b val/sum_acc |"
    assert len(lines) == 2 + len(digit)
    last_step = max(digit)
    assert f"| {last_step} | {100 * digit[last_step]:.2f} |" in table


def test_curves_of_a_tiny_run_have_one_row_per_validation(tiny_run):
    digit = read_scalars(tiny_run, "val/digit_acc")
    assert len(digit) == 1  # one epoch
    (step,) = digit
    assert curves_table([tiny_run], ["val/digit_acc"], ["tiny"]).splitlines() == [
        "| step | tiny val/digit_acc |",
        "|---|---|",
        f"| {step} | {100 * digit[step]:.2f} |",
    ]


def test_curves_explain_what_is_missing(tiny_run, tmp_path):
    with pytest.raises(UserError, match="No TensorBoard event files"):
        read_scalars(tmp_path, "val/digit_acc")
    with pytest.raises(UserError, match="has no scalar 'val/nothing'"):
        read_scalars(tiny_run, "val/nothing")
