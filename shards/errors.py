"""The one base class of user-facing errors.

Every error that is the user's input's fault (a file, a value, an argument, a cluster address) derives from
`UserError`; each CLI catches `UserError` in one place, prints its message on one line and exits 2. Anything else
that escapes is a bug in cavmae and keeps its traceback. A per-sample defect (`shards.schema.BadSample`) is not a
`UserError`: readers count and skip it.
"""


class UserError(ValueError):
    """A bad input the user can fix; the message is one line and names the file, key or argument."""


class NoSamples(UserError):
    """Shards from which no sample decodes (one line, naming the shards): every reading command stops with it
    (exit 2) rather than train, evaluate or write nothing."""
