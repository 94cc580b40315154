"""Errors caused by the user's input: the CLI prints them as one clear line, no traceback."""


class UserError(Exception):
    """Bad input (file, row, key, path): the message names it and says what is wrong."""
