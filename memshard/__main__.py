import sys

from memshard.cli import main

sys.exit(main())
