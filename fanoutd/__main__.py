"""`python -m fanoutd`."""

import sys

from fanoutd.cli import main

sys.exit(main())
