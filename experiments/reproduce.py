"""Reproduces one of the paper tables, resumably, with CSV / Markdown / PNG outputs.

  python -m experiments.reproduce --flagfile=experiments/flags/table_central_baselines.cfg \
      --data_dir=../shared/data
  python -m experiments.reproduce --table=fedrecon_ml1m --quick --data_dir=../shared/data

Tables: central_baselines, fedrecon_ml1m, ncf_ml1m, privacy_ml1m,
compression_ml1m, federated_ncf_ml100k, federated_ncf_ml1m (one module per table in experiments/tables/, listed in registry.py). Writes to --output_dir
(default results/<table>, results/<table>/quick with --quick): table.csv,
table.md, table.png, manifest.json (flags, seeds, versions, machine, every
cell's settings), cells/*.json (one finished cell each) and runs/ (training
run directories with checkpoints). Rerunning the same command skips finished
cells and resumes interrupted federated training from its checkpoint. Exits
with status 1 if a cell failed or could not run (unless --allow_skipped), or, with --quick (the CI smoke test), if a
model does not beat the trivial predictor (a full run reports that in the
Markdown instead).
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from absl import app
from absl import flags

from experiments import common_flags
from experiments.tables import common
from experiments.tables import harness
from experiments.tables import report
from experiments.tables import registry as tables

FLAGS = flags.FLAGS

flags.DEFINE_enum('table', None, list(tables.TABLES), 'Which table to reproduce.')
flags.DEFINE_string('output_dir', None,
                    'Output folder (default results/<table>, or results/<table>/quick).')
_DATA_DIR = common_flags.define_data_dir_flag(
    'Folder holding ml-100k.zip, ml-1m.zip and ncf-ml-1m.zip (e.g. ../shared/data).')
flags.DEFINE_string('ml_100k', None, 'ML-100K zip or folder (overrides --data_dir).')
flags.DEFINE_string('ml_1m', None, 'ML-1M zip or folder (overrides --data_dir).')
flags.DEFINE_string('ncf_ml_1m', None, 'NCF leave-one-out files, zip or folder '
                    '(overrides --data_dir).')
flags.DEFINE_list('seeds', None, 'Seeds (repetitions). Default 0,1,2; with --quick, 0. '
                  'central_baselines repeats over folds and uses the first seed.')
flags.DEFINE_bool('quick', False, 'Smoke test: few users, rounds and epochs.')
flags.DEFINE_integer('max_rounds', 100, 'Cap on federated rounds (0: no cap, e.g. '
                     'the 500 rounds of the FedRecon google-research baseline).')
flags.DEFINE_integer('max_epochs', 0, 'Cap on the central epochs of the ncf_ml1m '
                     'table (0: no cap, the paper\'s 20).')
flags.DEFINE_list('rows', [], 'Only the rows whose label contains one of these.')
flags.DEFINE_bool('progress_bar', False, 'Progress bars of the training runs.')
flags.DEFINE_bool(
    'allow_skipped', False, 'Accept cells that cannot run (e.g. a missing optional module) in a '
    'draft: their rows are marked skipped with the reason. Without it such a cell fails the '
    'command (exit status 1).')
flags.DEFINE_bool('list_cells', False, 'Print the cells (and whether done) and exit.')

flags.mark_flag_as_required('table')


def options_from_flags() -> harness.RunOptions:
  """Validated run options; app.UsageError naming the flag."""
  try:
    seeds = tuple(int(s) for s in FLAGS.seeds) if FLAGS.seeds is not None else None
  except ValueError as e:
    raise app.UsageError(f'--seeds must be integers, got {FLAGS.seeds}') from e
  if seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
    raise app.UsageError(f'--seeds must be distinct non-negative integers, got {FLAGS.seeds}')
  table = tables.get(FLAGS.table)
  if seeds is None:
    seeds = table.default_quick_seeds if FLAGS.quick else (0, 1, 2)
  if FLAGS.max_rounds < 0:
    raise app.UsageError(f'--max_rounds must be >= 0, got {FLAGS.max_rounds}')
  if FLAGS.max_epochs < 0:
    raise app.UsageError(f'--max_epochs must be >= 0, got {FLAGS.max_epochs}')
  paths = {}
  for flag, name in ((FLAGS['ml_100k'], common.ML100K), (FLAGS['ml_1m'], common.ML1M), (FLAGS['ncf_ml_1m'], common.NCF_ML1M)):
    if flag.value:
      if not os.path.exists(flag.value):
        raise app.UsageError(f'--{flag.name}={flag.value} does not exist')
      paths[name] = flag.value
  if _DATA_DIR.value and not os.path.isdir(_DATA_DIR.value):
    raise app.UsageError(f'--data_dir={_DATA_DIR.value} is not a folder')
  output_dir = FLAGS.output_dir or os.path.join(
      'results', FLAGS.table, *(['quick'] if FLAGS.quick else []))
  return harness.RunOptions(
      output_dir=output_dir, seeds=seeds, quick=FLAGS.quick,
      max_rounds=FLAGS.max_rounds or None, max_epochs=FLAGS.max_epochs or None,
      data_dir=_DATA_DIR.value, data_paths=paths,
      rows=tuple(FLAGS.rows), progress_bar=FLAGS.progress_bar, allow_skipped=FLAGS.allow_skipped)


def flag_values() -> dict:
  """The values of this binary's flags (for the manifest)."""
  names = ('table', 'output_dir', 'data_dir', 'ml_100k', 'ml_1m', 'ncf_ml_1m', 'seeds', 'quick',
           'max_rounds', 'max_epochs', 'rows', 'progress_bar', 'allow_skipped')
  return {n: FLAGS[n].value for n in names}


def list_cells(table: harness.TableSpec, options: harness.RunOptions) -> None:
  for cell in harness.select_cells(table.build_cells(options), options.rows):
    done = harness.load_finished(options.output_dir, cell) is not None
    print(f'{"done" if done else "todo"}  {cell.name}  ->  {", ".join(cell.rows)}')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  common_flags.quiet_logging()
  options = options_from_flags()
  table = tables.get(FLAGS.table)
  if FLAGS.list_cells:
    list_cells(table, options)
    return
  run = harness.run_table(table, options, describe_data=common.data_sources)
  command = ' '.join(shlex.quote(a) for a in [sys.executable, '-m', 'experiments.reproduce']
                     + sys.argv[1:])
  paths = report.write_outputs(table, run, options, command, flag_values())
  print(f'{table.name}: wrote {paths[report.MARKDOWN_NAME]}, {paths[report.CSV_NAME]}, '
        f'{paths[report.PLOT_NAME]}, {paths[report.MANIFEST_NAME]} '
        f'({run.wall_seconds:.0f}s)')
  for w in run.warnings:
    print(f'NOTE: {w}', file=sys.stderr)
  if not run.ok:
    for p in run.problems:
      print(f'PROBLEM: {p}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  common_flags.run(main)
