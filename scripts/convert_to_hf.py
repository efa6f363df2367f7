#!/usr/bin/env python
"""Convert a Megatron DirMoE checkpoint to a Hugging Face folder.

    python scripts/convert_to_hf.py --load /ckpts/run1 --out /export/run1-hf --verify

Same as ``python -m megatron_dirmoe.convert to-hf ...`` (see ``--help``); the reverse direction
is ``python -m megatron_dirmoe.convert to-megatron``.
"""

import sys

from megatron_dirmoe.convert.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["to-hf", *sys.argv[1:]]))
