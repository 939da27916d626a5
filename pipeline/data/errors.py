"""The one exception type the data layer raises for bad input, bad destinations and corrupt data."""


class DataError(Exception):
    """A data problem the user must fix (empty source, missing manifest, unwritable destination, corrupt shard).

    The message is one line naming the offending path/URL; the CLI prints it and exits with code 2.
    """
