"""`python -m mid_tf.serving` is the client CLI (same as `python -m mid_tf.serving.client`)."""

import sys

from mid_tf.serving.client import main

sys.exit(main())
