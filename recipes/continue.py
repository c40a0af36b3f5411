"""Continued pretraining: an AdaPonder model from a local Pythia (or PonderLM) checkpoint folder.

The recipe is ``zoo/recipes/continued.py``, installed with the library: this script and the
console script ``ponder-zoo continue`` run it with the same options (``--help`` lists them).
"""

import sys

from zoo.recipes.continued import main

if __name__ == "__main__":
    sys.exit(main())
