"""`python -m moduleserve.server` runs the gRPC server."""

import sys

from moduleserve.server.cli import main

sys.exit(main())
