"""`python -m learner` is `python -m learner.train`."""

import sys

from learner.train import main

sys.exit(main())
