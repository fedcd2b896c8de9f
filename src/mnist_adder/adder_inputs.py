"""Which digit output (`model.net.adder_input`) each adder can add, known without importing torch.

`DigitSumNet` refuses a mismatch when it is built, and `config_checks` refuses it from the adder's
`_target_` before anything is built (and before torch is imported): both read this table, so they agree.
"""

ADDER_INPUTS = ("logits", "softmax", "detached")
# The shift adders (models/adders.py) add the digit's distribution: raw logits are not one.
PROBABILITIES = ("softmax", "detached")
# By class name; an adder not named here (MLPAdder, SeedAdder) takes any input.
_ACCEPTED = {"ShiftAdder": PROBABILITIES, "ConvAdder": PROBABILITIES}


def accepted_adder_inputs(adder: str) -> tuple[str, ...]:
    """The `adder_input` values the adder class `adder` (a class name or a dotted `_target_`) can add."""
    return _ACCEPTED.get(adder.rpartition(".")[2], ADDER_INPUTS)
