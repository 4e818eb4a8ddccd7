"""``python -m twotower_rec VERB ...`` (also under ``torchrun -m twotower_rec``)."""

import sys

from twotower_rec.cli import main

sys.exit(main())
