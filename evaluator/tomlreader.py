"""TOML parsing for every module: the standard library's tomllib from Python 3.11, and on 3.10
tomli, the same parser published before it joined the standard library (same API, same errors)."""

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = ["tomllib"]
