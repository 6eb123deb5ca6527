"""``python -m distillery_client.cli`` is ``distill``."""

import sys

from distillery_client.cli import main

sys.exit(main())
