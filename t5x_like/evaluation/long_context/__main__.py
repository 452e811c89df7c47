"""``python -m t5x_like.evaluation.long_context``: see ``cli``."""

import logging
import sys

from t5x_like.cli import guarded
from t5x_like.evaluation.long_context.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    guarded(main)(sys.argv[1:])
