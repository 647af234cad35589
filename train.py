"""Entry point for `accelerate launch train.py RECIPE [key=value ...]`; the same as `qlora-kit train`."""

import sys

from qlora_kit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
