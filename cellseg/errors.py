"""The one exception type cellseg raises for user-facing problems."""


class CellsegError(Exception):
    """A problem the user can fix: the message names the file (if any) and what is wrong.

    The CLI prints it as one line and exits with code 2.
    """
