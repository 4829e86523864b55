"""`python -m client` runs the `moduleserve` CLI."""

import sys

from client.cli import main

sys.exit(main())
