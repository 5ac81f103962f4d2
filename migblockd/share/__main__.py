import sys

from migblockd.share.main import main

sys.exit(main())
