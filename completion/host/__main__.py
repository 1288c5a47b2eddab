import sys

from exlsp.completion.host.server import main

sys.exit(main())
