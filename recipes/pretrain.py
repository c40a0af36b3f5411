"""Pretraining from scratch: AdaPonderLM, PonderLM, Loop or plain Pythia, one or many processes.

The recipe is ``zoo/recipes/pretrain.py``, installed with the library: this script and the
console script ``ponder-zoo train`` run it with the same options (``--help`` lists them).
"""

import sys

from zoo.recipes.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
