import sys

from netswap.server.cli import main

sys.exit(main())
