"""Launch script: `accelerate launch fastairl/train.py RECIPE [key.sub=value ...] [--print-config]`.

Also runs as `python fastairl/train.py ...`, `torchrun --nproc_per_node N fastairl/train.py ...` and
`fastairl train ...`.
"""
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: sys.path[0] is fastairl/ itself, whose module names (config, models, ...) must
    # not shadow anything; import the package from the repository root instead.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from fastairl.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
