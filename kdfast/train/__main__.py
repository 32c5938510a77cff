"""``python -m kdfast.train`` (see :func:`kdfast.train.main`)."""

import sys

from kdfast.train import main

sys.exit(main())
