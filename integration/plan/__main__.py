"""``python -m integration.plan``: the planner CLI (see ``integration/plan/cli.py``)."""

import sys

from .cli import main

sys.exit(main())
