"""The one exception type a user is meant to see.

Anything raised as :class:`CoFormerError` is a problem the user can fix (a bad
file, a bad flag, a missing package); the CLIs print its message and exit
non-zero without a traceback. Any other exception is a bug and keeps its
traceback.
"""


class CoFormerError(Exception):
    """A user-facing error: the message names the bad value and what was expected."""


def missing_package(package: str, extra: str, purpose: str) -> CoFormerError:
    """The error for an optional dependency that is not installed."""
    return CoFormerError(
        f"{purpose} needs the '{package}' package, which is not installed: "
        f"pip install 'coformer[{extra}]'"
    )


def first_line(e: BaseException) -> str:
    """The first non-empty line of another library's exception (ONNX Runtime's, Polygraphy's span
    many): what a one-line :class:`CoFormerError` quotes of it."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
