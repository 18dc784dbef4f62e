import sys

from redis_ws_gateway.cli import main

sys.exit(main())
