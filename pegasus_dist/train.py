"""The entry point every launcher runs: ``accelerate launch pegasus_dist/train.py --config ...``.

The same :func:`pegasus_dist.training.loop.main` as ``pegasus-dist train``.
"""

from pegasus_dist.training.loop import main

if __name__ == "__main__":
    main()
