"""`python -m server` runs the gRPC server."""

import sys

from server.cli import main

sys.exit(main())
