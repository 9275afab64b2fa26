"""The one base class of every error that is the user's to fix (a bad config value, a missing
or malformed file, a run directory in use, ...). Its message is complete in one line: what was
wrong and what would be right. The command-line tools print it without a traceback; anything
else is a bug and keeps its traceback."""


class UserError(Exception):
    """An input or environment problem, explained in the message."""
