"""Re-keys committed table cells after a change to how cell params are written.

A cell's key hashes its params (`harness.Cell.params_hash`). When the params
of the same settings are written differently (execution-only fields moved out
of `FederatedConfig`, fields at their default left out), committed results
are still the results of those settings but sit under old keys. This tool,
for every `results/*/manifest.json`:

1. rebuilds the table's cells with the manifest's options;
2. finds the committed cell of the same name;
3. checks that its stored params describe the same settings: every setting
   present in both is equal, a setting only in the old params is an
   execution-only field (a field of `ExecutionConfig`), and a setting only in
   the new full params is at its default value;
4. writes the result under the new key (same metrics, new params and hash),
   removes the old file, and updates the manifest's entries.

Nothing is changed unless every cell of every manifest passes step 3.

  .venv/bin/python tools/migrate_cell_keys.py            # check and migrate
  .venv/bin/python tools/migrate_cell_keys.py --dry_run  # only check
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from experiments.tables import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.tables import registry as tables  # pylint: disable=g-import-not-at-top,wrong-import-position
from tff_rec.training import artifacts  # pylint: disable=g-import-not-at-top,wrong-import-position
from tff_rec.training import execution  # pylint: disable=g-import-not-at-top,wrong-import-position

_EXECUTION_FIELDS = {f.name for f in dataclasses.fields(execution.ExecutionConfig)}


def _flatten(value: Any, prefix: str = '') -> dict:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: value}


def _options(out_dir: str, record: dict) -> harness.RunOptions:
  opts = record['options']
  return harness.RunOptions(out_dir, seeds=tuple(opts['seeds']), quick=opts['quick'],
                            max_rounds=opts['max_rounds'], max_epochs=opts.get('max_epochs'),
                            rows=tuple(opts.get('rows', ())))


def _cells(record: dict, options: harness.RunOptions, full: bool) -> list:
  """The table's cells; with `full`, configs written whole (no default omission)."""
  saved = harness.config_params
  if full:
    harness.config_params = lambda v: harness._canonical(v)  # pylint: disable=protected-access
  try:
    return harness.select_cells(tables.get(record['table']).build_cells(options), options.rows)
  finally:
    harness.config_params = saved


def _check(old: dict, new_full: dict, new: dict) -> list[str]:
  """Problems that make `old` and `new` different settings (empty: the same)."""
  problems = []
  a, b, kept = _flatten(old), _flatten(harness._canonical(new_full)), _flatten(  # pylint: disable=protected-access
      harness._canonical(new))  # pylint: disable=protected-access
  for key in sorted(set(a) | set(b)):
    if key in a and key in b:
      if a[key] != b[key]:
        problems.append(f'{key}: {a[key]!r} -> {b[key]!r}')
    elif key in a:
      if key.split('.')[-1] not in _EXECUTION_FIELDS:
        problems.append(f'{key} ({a[key]!r}) is gone and is not an execution field')
    elif key in kept:
      problems.append(f'{key} ({b[key]!r}) is new and not at its default')
  return problems


def main(argv: list[str]) -> int:
  dry_run = '--dry_run' in argv
  plan, failures = [], []
  for manifest_path in sorted(glob.glob(os.path.join(_REPO, 'results', '*', 'manifest.json'))):
    out = os.path.dirname(manifest_path)
    record = artifacts.read_json(manifest_path)
    options = _options(out, record)
    full = {c.name: c for c in _cells(record, options, full=True)}
    committed = {entry['name']: entry for entry in record['cells']}
    for cell in _cells(record, options, full=False):
      entry = committed.get(cell.name)
      if entry is None:
        failures.append(f'{out}: cell {cell.name} is not in the manifest')
        continue
      old_path = os.path.join(out, entry['result_file'])
      new_path = harness.cell_path(out, cell)
      if os.path.abspath(old_path) == os.path.abspath(new_path):
        continue
      stored = artifacts.read_json(old_path)
      problems = _check(stored['params'], full[cell.name].params, cell.params)
      if problems:
        failures.append(f'{old_path}: ' + '; '.join(problems))
      plan.append((manifest_path, entry['name'], old_path, new_path, cell))
  for failure in failures:
    print('NOT THE SAME SETTINGS:', failure)
  if failures:
    return 1
  print(f'{len(plan)} cells to re-key')
  if dry_run:
    for _, _, old, new, _ in plan:
      print(f'  {os.path.relpath(old, _REPO)} -> {os.path.basename(new)}')
    return 0
  manifests = {}
  for manifest_path, name, old_path, new_path, cell in plan:
    stored = artifacts.read_json(old_path)
    stored['params'] = harness._canonical(cell.params)  # pylint: disable=protected-access
    stored['params_hash'] = cell.params_hash
    artifacts.write_json(new_path, stored)
    if os.path.exists(old_path) and os.path.abspath(old_path) != os.path.abspath(new_path):
      os.remove(old_path)
    record = manifests.setdefault(manifest_path, artifacts.read_json(manifest_path))
    for entry in record['cells']:
      if entry['name'] == name:
        out = os.path.dirname(manifest_path)
        entry['key'] = cell.key
        entry['result_file'] = os.path.relpath(new_path, out)
        entry['run_dir'] = os.path.relpath(harness.cell_run_dir(out, cell), out)
        entry['params'] = harness._canonical(cell.params)  # pylint: disable=protected-access
  for manifest_path, record in manifests.items():
    artifacts.write_json(manifest_path, record)
  print(f're-keyed {len(plan)} cells in {len(manifests)} manifests')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
