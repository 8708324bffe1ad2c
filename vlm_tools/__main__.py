"""``python -m vlm_tools`` is the ``vlm-tools`` command."""

import sys

from .cli import main

sys.exit(main())
