"""Session-wide test settings."""

import atexit
import os
import shutil
import tempfile

# The node-local disk image cache (data.cache auto/disk) of every test, and of the CLI and Ray
# processes the tests start, goes to one temporary folder of this session, not ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="ablate-test-cache-")
os.environ["ABLATE_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
