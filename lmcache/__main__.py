import sys

from lmcache.cli import main

sys.exit(main())
