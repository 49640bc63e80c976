"""``accelerate launch pegasus_dist/train.py --config ...``: the main of ``pegasus-dist train``."""

from pegasus_dist.training.loop import main

if __name__ == "__main__":
    main()
