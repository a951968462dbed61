"""The ``broker`` command: a thin click application over the ``broker`` library.

Commands parse their arguments and run one coroutine of the library; every error a user can
cause is turned into one line on stderr at a single boundary (:class:`broker.cli.main.BrokerGroup`).
"""
