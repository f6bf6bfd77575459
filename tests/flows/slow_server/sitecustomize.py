"""Put on PYTHONPATH by test_prefect_start.py: a Python process serving Prefect's API (``python -m uvicorn``)
sleeps before it starts, as the ephemeral server does on a machine under load."""

import os
import sys
import time

if "uvicorn" in sys.orig_argv and "prefect" in " ".join(sys.orig_argv):
    time.sleep(float(os.environ.get("RECPIPE_TEST_SERVER_DELAY_S", "0")))
