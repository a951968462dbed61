"""A handler module that fails while importing (for the usage-error tests)."""

raise RuntimeError("this module fails at import")
