"""``python -m gigapatch …`` (and ``torchrun … -m gigapatch train …``): the command line."""

import sys

from gigapatch.cli import main

sys.exit(main())
