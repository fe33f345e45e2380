"""``python -m sam_backend`` is the ``sam-backend`` command."""

import sys

from sam_backend.commands.cli import main

sys.exit(main())
