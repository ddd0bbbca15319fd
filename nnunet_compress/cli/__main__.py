"""``python -m nnunet_compress.cli``: the same command as ``nnunet-compress``."""

import sys

from nnunet_compress.cli.main import main

sys.exit(main())
