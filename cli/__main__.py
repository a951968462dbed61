"""``python -m cli`` runs the ``broker`` command."""

from cli.main import main

if __name__ == "__main__":
    main()
