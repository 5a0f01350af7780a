import sys
from pathlib import Path

# tests/ is importable as a package (tests.support); make sure the repo root is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
