"""``python -m painnet.realtime`` / ``painnet-realtime``: see :mod:`painnet.realtime.cli`."""

import sys

from painnet.realtime.cli import main

sys.exit(main())
