import sys

from redis_ws_bench.bench import main

sys.exit(main())
