"""`python -m deploy status | list | promote ID | rollback | pin ID | canary ID PERCENT | ...`"""

import sys

from .cli import main

sys.exit(main())
