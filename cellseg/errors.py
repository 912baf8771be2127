"""The one exception type cellseg raises for user-facing problems."""


class CellsegError(Exception):
    """A problem the user can fix: the message names the file (if any) and what is wrong.

    The CLI prints it as one line and exits with code 2.
    """


def in_cwd(path) -> str:
    """' (looked in CWD)' for a relative path, '' for an absolute one: for "not found" messages,
    since a relative path may be read from another folder than the user thinks (`mlflow run`
    works in the project folder)."""
    import os

    return "" if os.path.isabs(path) else f" (looked in {os.getcwd()})"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (MLflow's `message` when it has one), at most
    200 characters; the exception's type when the message is empty."""
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def is_mlflow_error(exc: BaseException) -> bool:
    """True for an MlflowException (matched by name: checking needs no mlflow import)."""
    return any(c.__name__ == "MlflowException" for c in type(exc).__mro__)
