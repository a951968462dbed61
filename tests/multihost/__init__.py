"""Multi-host tests: worker processes in network namespaces, a server on a bridge."""
