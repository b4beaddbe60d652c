"""The one error type of the data path: a bad record, file or option, with a reason key for the skip counters."""


class DataError(Exception):
    """A bad input record or file; `reason` is the counter key used in the report."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason
