"""python -m cow.server: the command line (cow/cli.py).  It imports the server, and with it the
compiled engine, only to serve: --help needs no engine, and a missing one is one line."""

import sys

from cow.cli import main

sys.exit(main())
