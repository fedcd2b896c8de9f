"""The one error type for mistakes a user can fix (bad config, missing data, bad files).

Entry scripts print its message as a short paragraph and exit non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in the message: what is wrong and what to do."""
