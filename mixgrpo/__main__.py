import sys

from mixgrpo.cli import main

sys.exit(main())
