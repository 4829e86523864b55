"""`python -m registry` runs the admin CLI."""

import sys

from registry.cli import main

sys.exit(main())
