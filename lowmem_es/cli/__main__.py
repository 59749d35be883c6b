"""``python -m lowmem_es.cli``: the ``lowmem-es`` command (what torchrun launches)."""

import sys

from lowmem_es.cli import main

sys.exit(main())
