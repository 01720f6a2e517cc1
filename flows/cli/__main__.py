"""``python -m vq_flows.cli``: the ``vq`` command."""

import sys

from vq_flows.cli import main

if __name__ == "__main__":
    sys.exit(main())
