"""``pegasus-dist`` and ``python -m pegasus_dist``: the CLI, imported under its own Ctrl-C handling
(:func:`pegasus_dist.console.import_entry`), since its imports (torch) take seconds."""

from __future__ import annotations

from pegasus_dist.console import import_entry


def main() -> None:
    import_entry("pegasus_dist.cli").main()


if __name__ == "__main__":
    main()
