"""The version of DIMS, as `python main.py --version` and `dims --version` print it.

One constant, so that every entry point says the same. Imports nothing.
"""

__version__ = "1.1.0"
