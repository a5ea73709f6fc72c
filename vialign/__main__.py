"""``python -m vialign ...`` (and ``accelerate launch -m vialign train CONFIG``) = the ``vialign`` command."""

import sys

from vialign.cli import main

sys.exit(main())
