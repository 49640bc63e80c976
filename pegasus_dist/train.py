"""Train one phase of the winged-horse VAE: the entry point every launcher runs.

    accelerate launch pegasus_dist/train.py --config configs/pretrain.yaml [section.key=value ...]
    python pegasus_dist/train.py --config configs/smoke/pretrain.yaml
    pegasus-dist train --config ...          (the same function, pegasus_dist.training.loop.main)

The loop itself is pegasus_dist/training/loop.py. Tests inject faults into
this very entry point with ``PEGASUS_FAULT`` (pegasus_dist/training/hooks.py).
"""

from pegasus_dist.training.loop import main

if __name__ == "__main__":
    main()
