"""``pegasus-dist`` and ``python -m pegasus_dist``: the CLI, imported under its own Ctrl-C handling,
since its imports (torch) take seconds: an interrupt then is one line and exit 130, as later."""

from __future__ import annotations

import importlib

from pegasus_dist.console import exit_on_user_error


def main() -> None:
    exit_on_user_error(lambda: importlib.import_module("pegasus_dist.cli")).main()


if __name__ == "__main__":
    main()
