"""The error type for bad user input: each message is one sentence naming the file, field or tensor."""

# Set (to anything) to see the full traceback of a failure the command line would report in one line.
DEBUG_ENV = "FOURD_JAX_DEBUG"


class InputError(ValueError):
    """Input a user supplied (a file, config field, tensor or flag) that cannot be used as is."""


def first_line(error: BaseException, limit: int = 300, root: bool = False) -> str:
    """An exception's type and first non-empty line, shortened: what a one-line report can carry.
    `root`: report the innermost exception of its chain instead (Orbax wraps tensorstore's message,
    which names the tensor and the file that is missing or damaged)."""
    if root:
        error = root_cause(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception an error was raised from (or while handling)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner
