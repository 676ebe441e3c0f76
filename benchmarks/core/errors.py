"""Errors a benchmark command reports to its user as one line, without a traceback."""


class BenchmarkError(Exception):
    """A problem with the user's input (recipe, data, flags or run folder), not a bug."""


class RecipeError(BenchmarkError, ValueError):
    """A recipe file or a ``--set`` override is invalid."""


class DataError(BenchmarkError):
    """A dataset is missing, malformed or unreadable."""


class CheckpointError(BenchmarkError, ValueError):
    """A checkpoint is corrupt or belongs to another run; it is never half-loaded."""
