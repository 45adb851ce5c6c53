"""Lifts protobuf's parse-depth limit so deep TFF computations serialize.

TFF builds a computation's proto bottom-up, copying each child message into
its parent. Under protobuf's upb backend (the default for protobuf 4.x) every
copy is a parse limited to 100 levels of nesting, which large compositions
exceed: e.g. `build_fed_recon` or `build_unweighted_fed_avg` with the
distributed-DP aggregator (`--dp=ddp`) fail with `DecodeError: Error parsing
message`. The computations are our own, not untrusted input, so the limit is
raised for this process.
"""


def allow_deep_protos() -> bool:
  """Raises upb's decode depth limit; False if another backend is in use."""
  try:
    from google._upb import _message  # pylint: disable=g-import-not-at-top
  except ImportError:  # python or cpp backend: no such limit on copies
    return False
  _message.SetAllowOversizeProtos(True)
  return True
