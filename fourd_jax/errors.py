"""The error type for bad user input: each message is one sentence naming the file, field or tensor."""


class InputError(ValueError):
    """Input a user supplied (a file, config field, tensor or flag) that cannot be used as is."""
