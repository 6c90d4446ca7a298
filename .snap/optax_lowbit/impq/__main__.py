"""``python -m optax_lowbit.impq``: see `optax_lowbit.impq.cli`."""

import sys

from optax_lowbit.impq import cli

if __name__ == "__main__":
    sys.exit(cli.main())
