import sys

from netswap.common import grpcenv

sys.exit(grpcenv.server())
