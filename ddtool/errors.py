"""User-facing errors.

Anything a user can cause (a missing dataset, a wrong file, a bad option) raises a
DDToolError whose message is one readable paragraph saying what is wrong and what to do.
The CLI prints it and exits with status 2; everything else is a bug and keeps its traceback.
"""


class DDToolError(Exception):
    """An error caused by input or environment, reported to the user without a traceback."""


class DatasetNotFoundError(DDToolError):
    pass


class ConfigError(DDToolError):
    pass


class FormatError(DDToolError):
    """A file that is not what it claims to be: foreign, corrupt, or of an unknown schema."""
