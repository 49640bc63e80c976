"""``accelerate launch pegasus_dist/train.py --config ...``: the main of ``pegasus-dist train``."""

import importlib

from pegasus_dist.console import exit_on_user_error

if __name__ == "__main__":
    # Imported under the run's own Ctrl-C handling: torch takes seconds to import, and an
    # interrupt then is one line and exit 130, as later.
    exit_on_user_error(lambda: importlib.import_module("pegasus_dist.training.loop")).main()
