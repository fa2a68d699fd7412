import os
import sys
import tempfile
from pathlib import Path

# Test helpers (analytic flows, tiny models) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
# Text-embedding caches go to a temp folder shared by test sessions, not the user's home.
os.environ.setdefault("MIXGRPO_CACHE", str(Path(tempfile.gettempdir()) / "mixgrpo-test-cache"))
