"""``python -m broker.cli`` runs the ``broker`` command."""

from broker.cli.main import main

if __name__ == "__main__":
    main()
