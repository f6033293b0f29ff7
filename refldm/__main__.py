import sys

from refldm.cli import main

sys.exit(main())
