"""``python -m fxopt ...`` is the ``fxopt`` command (and what ``torchrun -m fxopt`` runs)."""
import sys

from .cli import main

sys.exit(main())
