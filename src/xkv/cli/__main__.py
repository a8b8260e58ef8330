"""``python -m xkv.cli``: the ``xkv`` command (torchrun and accelerate launch a module, not a script)."""

import sys

from xkv.cli import main

sys.exit(main())
