"""The one exception type for bad input: the command line turns it into a message and exit code 2."""


class InputError(Exception):
    """Bad input or configuration: the message names the file, column, key or option, and the fix."""
