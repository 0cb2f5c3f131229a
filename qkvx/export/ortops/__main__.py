"""python -m qkvx.export.ortops: fetch onnxruntime's headers if needed, build the custom op,
print its path."""

import sys

from qkvx.errors import QkvxError
from qkvx.export.ortops import library_path

try:
    print(library_path())
except QkvxError as e:
    sys.exit(str(e))
