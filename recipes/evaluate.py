"""Evaluation: perplexity, depth, compute, NLL by depth, plots, and lm-eval tasks.

The recipe is ``zoo/recipes/evaluate.py``, installed with the library: this script and the
console script ``ponder-zoo evaluate`` run it with the same options (``--help`` lists them).
"""

import sys

from zoo.recipes.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
