"""`UsageError`: what `imse-eval` was asked cannot run as given (docs/design.md, section 12)."""


class UsageError(ValueError):
    """A bad option or value, a missing file or directory, a data set that does not fit the model.

    `imse-eval` prints it and exits with status 2, as it does for a bad method config (`tta.ConfigError`);
    every other exception is a bug and shows its traceback.
    """
