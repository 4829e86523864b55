"""`python -m moduleserve.registry` runs the admin CLI."""

import sys

from moduleserve.registry.cli import main

sys.exit(main())
