"""Pin the public names: adding or removing one is a deliberate change."""

import broker


def test_public_names() -> None:
    assert broker.__all__ == sorted(broker.__all__, key=str.casefold) or broker.__all__ == sorted(
        broker.__all__
    )
    for name in broker.__all__:
        assert hasattr(broker, name), name
    assert {n for n in dir(broker) if not n.startswith("_") and n[0].isupper()} <= set(
        broker.__all__
    )


def test_library_does_not_import_applications() -> None:
    """``broker/`` is the library; ``broker.cli`` and ``broker.workers`` (the top-level ``cli/``
    and ``workers/`` folders, linked into the package) are applications on top of it."""
    import pathlib

    root = pathlib.Path(broker.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        for app in ("workers", "cli"):
            assert f"broker.{app}" not in text and f"from .{app}" not in text, (path, app)
