"""`python -m lusd_jax.cli`: the `lusd-jax` command."""

import sys

from lusd_jax.cli import main

sys.exit(main())
