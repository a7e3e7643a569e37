"""``python -m sparsekern ...`` (and ``torchrun ... -m sparsekern prune ...``): the CLI."""

import sys

from .cli import main

sys.exit(main())
