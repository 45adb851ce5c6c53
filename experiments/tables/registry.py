"""The published tables `python -m experiments.reproduce --table=<name>` can run.

Each table is one module in this package declaring its rows, cells and
published numbers; a new table is a new module plus one line here.
"""

from __future__ import annotations

from typing import Callable

from experiments.tables import central_baselines
from experiments.tables import compression_ml1m
from experiments.tables import federated_ncf
from experiments.tables import fedrecon_ml1m
from experiments.tables import harness
from experiments.tables import ncf_ml1m
from experiments.tables import privacy_ml1m

TABLES: dict[str, Callable[[], harness.TableSpec]] = {
    'central_baselines': central_baselines.central_baselines_table,
    'fedrecon_ml1m': fedrecon_ml1m.fedrecon_table,
    'ncf_ml1m': ncf_ml1m.ncf_table,
    'privacy_ml1m': privacy_ml1m.privacy_table,
    'compression_ml1m': compression_ml1m.compression_table,
    'federated_ncf_ml100k': federated_ncf.federated_ncf_ml100k_table,
    'federated_ncf_ml1m': federated_ncf.federated_ncf_ml1m_table,
}


def get(name: str) -> harness.TableSpec:
  """The table called `name`.

  Args:
    name: A key of `TABLES`.

  Returns:
    The table's `harness.TableSpec` (rows, cells, report settings).

  Raises:
    ValueError: `name` is not a table; the message lists the valid names.
  """
  if name not in TABLES:
    raise ValueError(f'unknown table {name!r}; valid: {", ".join(TABLES)}')
  return TABLES[name]()
