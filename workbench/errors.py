"""User-facing error type.

`WorkbenchError` marks a mistake the user can fix (a bad path, spec, plan or text file). The CLI prints its
message as one line on stderr and exits non-zero; anything else is a bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """A user mistake, explained in one line that names the layer, file or value at fault."""
