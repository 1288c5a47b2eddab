import sys

from exlsp.server.cli import main

sys.exit(main())
