"""python -m qkvx.export.ortops: fetch onnxruntime's headers if needed, build the custom op,
print its path."""

import sys

from qkvx.errors import QkvxError
from qkvx.export.ortops import library_path

try:
    print(library_path())
except QkvxError as e:  # one line, exit 2: what to install or set
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
