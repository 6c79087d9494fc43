"""`python -m appliance serve ...` behaves exactly like the `hft-appliance` console script."""

import sys

from appliance.cli import main

sys.exit(main())
