import sys

from ftray.cli import main

sys.exit(main())
