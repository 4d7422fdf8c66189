import sys

from netswap.client.cli import main

sys.exit(main())
