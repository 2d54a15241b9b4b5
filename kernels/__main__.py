"""`python -m hotlora.kernels DIR`: build the C kernels' module into DIR, for $HOTLORA_KERNELS_DIR."""

import sys

from .native import main

sys.exit(main())
