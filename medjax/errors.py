"""Error types. The CLI prints a `MedjaxError` as one line (a traceback only with --debug)."""


class MedjaxError(Exception):
  """Bad input or state the user can fix; the message names the file, field or value."""


class ConfigError(MedjaxError):
  """A malformed or unsupported model/run configuration."""


class CheckpointError(MedjaxError):
  """A missing, unsafe, corrupt or mismatched checkpoint."""


class DataError(MedjaxError):
  """A data file that cannot be read or parsed."""


class UsageError(MedjaxError):
  """A command-line argument that is missing, malformed, out of range or a bad path."""
