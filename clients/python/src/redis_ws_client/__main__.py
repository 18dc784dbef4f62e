import sys

from redis_ws_client.cli import main

sys.exit(main())
