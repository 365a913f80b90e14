"""Contracts shared by every stage: reason codes, shard layout, storage, typed configs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("webclip")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
