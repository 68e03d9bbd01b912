"""``python -m peer`` is ``swarmtrain``."""

import sys

from peer.cli import main

sys.exit(main())
