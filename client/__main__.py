"""`python -m moduleserve.client` runs the `moduleserve` CLI."""

import sys

from moduleserve.client.cli import main

sys.exit(main())
