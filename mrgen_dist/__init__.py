"""mrgen-dist: scanner-conditioned synthesis of brain MR slices on HPC clusters."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mrgen-dist")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
