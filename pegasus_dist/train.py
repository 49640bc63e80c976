"""The entry point every launcher runs: ``accelerate launch pegasus_dist/train.py --config ...``.

``python pegasus_dist/train.py`` and ``pegasus-dist train`` run the same
:func:`pegasus_dist.training.loop.main`; tests inject faults into it with ``PEGASUS_FAULT``.
"""

from pegasus_dist.training.loop import main

if __name__ == "__main__":
    main()
