"""The demo: AdaPonder on a CPU against fixed-depth PonderLM, trained side by side, in minutes.

The recipe is ``zoo/recipes/demo.py``, installed with the library: this script and the
console script ``ponder-zoo demo`` run it with the same options (``--help`` lists them).
"""

import sys

from zoo.recipes.demo import main

if __name__ == "__main__":
    sys.exit(main())
