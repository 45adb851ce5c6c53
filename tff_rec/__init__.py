"""tff-rec: federated, differentially private, compressed recommenders on TFF.

Importing the package checks the installed TensorFlow / TFF versions first and
refuses to start (exit status 2, one clear message) on versions it was not
built for; see `tff_rec.version`.
"""

import sys as _sys

from tff_rec import version as _version

__version__ = _version.__version__

try:
  _version.check_stack()
except _version.StackVersionError as _e:
  _sys.stderr.write(f'error: {_e}\n')
  raise SystemExit(2) from None
