"""`python -m moecarve ...`: the same command line as the `moecarve` script."""

import sys

from .cli import main

sys.exit(main())
