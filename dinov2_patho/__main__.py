import sys

from dinov2_patho.cli import main

sys.exit(main())
