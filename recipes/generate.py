"""Text generation with each token's depth shown.

The recipe is ``zoo/recipes/generate.py``, installed with the library: this script and the
console script ``ponder-zoo generate`` run it with the same options (``--help`` lists them).
"""

import sys

from zoo.recipes.generate import main

if __name__ == "__main__":
    sys.exit(main())
