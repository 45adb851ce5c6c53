"""tff-rec: federated, differentially private, compressed recommenders on TFF.

Importing the package checks the installed TensorFlow / TFF versions first and
refuses to start (exit status 2, one clear message) on versions it was not
built for; see `tff_rec.version`. It also lifts protobuf's parse-depth
limit, which deep TFF computations exceed (`tff_rec.proto_limits`).
"""

import sys as _sys

from tff_rec import proto_limits as _proto_limits
from tff_rec import version as _version

__version__ = _version.__version__

try:
  _version.check_stack()
except _version.StackVersionError as _e:
  _sys.stderr.write(f'error: {_e}\n')
  raise SystemExit(2) from None

_proto_limits.allow_deep_protos()
