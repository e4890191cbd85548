import sys

from moecraft.cli import main

sys.exit(main())
