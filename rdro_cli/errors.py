"""The one error type a user can cause: printed as one line by the CLI, exit code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, flags, data, artifacts), not a bug.

    The message is a single line that says what is wrong, where, and how to fix it.
    """

    exit_code = 2
