"""``python -m policytrace`` (and ``torchrun ... -m policytrace``): the command line."""

import sys

from .pipeline.cli import main

sys.exit(main())
