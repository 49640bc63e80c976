"""``accelerate launch pegasus_dist/train.py --config ...``: the main of ``pegasus-dist train``."""

from pegasus_dist.console import import_entry

if __name__ == "__main__":
    import_entry("pegasus_dist.training.loop").main()
