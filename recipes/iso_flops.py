"""Iso-FLOPs: AdaPonder against the fixed-depth frontier and fixed pruning, on paired seeds.

The recipe is ``zoo/recipes/iso_flops.py``, installed with the library: this script and the
console script ``ponder-zoo iso-flops`` run it with the same options (``--help`` lists them).
"""

import sys

from zoo.recipes.iso_flops import main

if __name__ == "__main__":
    sys.exit(main())
