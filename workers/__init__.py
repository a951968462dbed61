"""Applications on top of the ``broker`` library: the demo and the worker runtime."""
