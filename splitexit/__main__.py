"""`python -m splitexit` (and `torchrun -m splitexit`) runs the `splitexit` command."""

import sys

from .cli import main

sys.exit(main())
