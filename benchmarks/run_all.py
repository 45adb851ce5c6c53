"""Runs every benchmark (`make bench`); each writes <name>.json and <name>.md.

  python -m benchmarks.run_all                       # all, into runs/benchmarks
  python -m benchmarks.run_all --smoke --out_dir=/tmp/b   # tiny, seconds-to-minutes
  python -m benchmarks.run_all --only=accountant_speed

Each benchmark runs in its own process (clean memory peaks, no shared TFF
context). `benchmarks/compression_benchmark.py`, when present, runs too
(its binary, with fewer epochs and requests under `--smoke`). An index `run_all.json` and `run_all.md` list
what ran, where its results are, and any failure; the exit status is 1 if
any benchmark failed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import traceback
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from benchmarks import common

FLAGS = flags.FLAGS

BENCHMARKS = ('federated_speed', 'algorithm_speed', 'accountant_speed', 'compression_benchmark',
              'secagg_cost', 'pfedrec_speed')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED_DATA = os.path.join(os.path.dirname(_REPO_ROOT), 'shared', 'data')

flags.DEFINE_string('out_dir', os.path.join('runs', 'benchmarks'), 'Where results are written.')
flags.DEFINE_bool('smoke', False, 'Tiny synthetic versions (checks they run; numbers meaningless).')
flags.DEFINE_list('only', [], f'Run only these benchmarks (of {", ".join(BENCHMARKS)}).')
flags.DEFINE_string('data_dir', None, 'Folder holding ml-100k.zip / ml-1m.zip (default: '
                    '../shared/data next to the repo if present, else the usual MovieLens search).')
flags.DEFINE_list('scenarios', [], 'federated_speed / algorithm_speed / pfedrec_speed: run only '
                  'these scenarios '
                  '(default: all).')
flags.DEFINE_list('variants', [], 'federated_speed: run only these variants (default: all).')
flags.DEFINE_bool('in_process', False, 'Run the benchmarks in this process (no subprocess each).')


def available(name: str) -> bool:
  """Whether `benchmarks/<name>.py` exists."""
  return importlib.util.find_spec(f'benchmarks.{name}') is not None


def default_data_dir() -> Optional[str]:
  """$TFF_REC_DATA_DIR, else ../shared/data beside the repository if present."""
  if os.environ.get('TFF_REC_DATA_DIR'):
    return os.environ['TFF_REC_DATA_DIR']
  return _SHARED_DATA if os.path.isdir(_SHARED_DATA) else None


def run_one(name: str, out_dir: str, smoke: bool, data_dir: Optional[str]) -> Optional[str]:
  """Runs one benchmark in this process; the path of its JSON (if known)."""
  if name == 'federated_speed':
    from benchmarks import federated_speed  # pylint: disable=g-import-not-at-top
    return federated_speed.run(out_dir, smoke=smoke, data_dir=data_dir,
                               only_scenarios=FLAGS.scenarios if FLAGS.is_parsed() else (),
                               variants=FLAGS.variants if FLAGS.is_parsed() else ())
  if name == 'algorithm_speed':
    from benchmarks import algorithm_speed  # pylint: disable=g-import-not-at-top
    return algorithm_speed.run(out_dir, smoke=smoke, data_dir=data_dir,
                               only_scenarios=FLAGS.scenarios if FLAGS.is_parsed() else ())
  if name == 'accountant_speed':
    from benchmarks import accountant_speed  # pylint: disable=g-import-not-at-top
    return accountant_speed.run(out_dir, smoke=smoke)
  if name == 'secagg_cost':
    from benchmarks import secagg_cost  # pylint: disable=g-import-not-at-top
    return secagg_cost.run(out_dir, smoke=smoke, data_dir=data_dir)
  if name == 'pfedrec_speed':
    from benchmarks import pfedrec_speed  # pylint: disable=g-import-not-at-top
    return pfedrec_speed.run(out_dir, smoke=smoke, data_dir=data_dir,
                             only_scenarios=FLAGS.scenarios if FLAGS.is_parsed() else ())
  if name == 'compression_benchmark':
    # Another module's absl binary (flags prefixed `compression_`).
    argv = [sys.executable, '-m', 'benchmarks.compression_benchmark',
            f'--compression_output_dir={out_dir}']
    if data_dir:
      argv.append(f'--compression_data={os.path.join(data_dir, "ml-1m.zip")}')
    if smoke:
      argv += ['--compression_epochs=1', '--compression_finetune_epochs=1',
               '--compression_latency_requests=50', '--compression_size_dims=',
               '--compression_prune_sparsities=0.8', '--compression_federated_rounds=1',
               '--compression_federated_clients=5']
    subprocess.run(argv, check=True, cwd=_REPO_ROOT)
    return os.path.join(out_dir, 'compression_benchmark.json')
  raise ValueError(f'no way to run benchmark {name!r}')


def _subprocess(name: str, out_dir: str, smoke: bool, data_dir: Optional[str]) -> None:
  argv = [sys.executable, '-m', 'benchmarks.run_all', '--in_process', f'--only={name}',
          f'--out_dir={out_dir}', f'--smoke={smoke}', f'--scenarios={",".join(FLAGS.scenarios)}',
          f'--variants={",".join(FLAGS.variants)}']
  if data_dir:
    argv.append(f'--data_dir={data_dir}')
  subprocess.run(argv, check=True, cwd=_REPO_ROOT)


def run_all(out_dir: str, names: Sequence[str], smoke: bool, data_dir: Optional[str],
            in_process: bool) -> dict:
  """Runs `names`; writes the index; {name: status row}."""
  started = time.time()
  out_dir = os.path.abspath(out_dir)
  index = {}
  for name in names:
    row = {'status': 'skipped', 'json': None, 'seconds': None}
    if not available(name):
      row['why'] = f'benchmarks/{name}.py not present'
      index[name] = row
      continue
    t0 = time.perf_counter()
    try:
      if in_process:
        run_one(name, out_dir, smoke, data_dir)
      else:
        _subprocess(name, out_dir, smoke, data_dir)
      row['status'] = 'ok'
    except Exception as e:  # pylint: disable=broad-except
      logging.error('benchmark %s failed: %s', name, traceback.format_exc())
      row['status'] = 'failed'
      row['error'] = f'{type(e).__name__}: {e}'
    row['seconds'] = round(time.perf_counter() - t0, 1)
    path = os.path.join(out_dir, f'{name}.json')
    row['json'] = path if os.path.exists(path) else None
    index[name] = row
  if not in_process:
    lines = ['# Benchmarks', '', common.machine_line(), '']
    lines.append(common.markdown_table(
        [{'benchmark': k, **v} for k, v in index.items()],
        ['benchmark', 'status', 'seconds', 'json', 'why', 'error']))
    for name, row in index.items():
      md = os.path.join(out_dir, f'{name}.md')
      if row['status'] == 'ok' and os.path.exists(md):
        with open(md) as f:
          lines += ['', f.read()]
    common.write_result(out_dir, 'run_all', {'benchmarks': list(names), 'smoke': smoke,
                                             'data_dir': data_dir}, index, '\n'.join(lines), started)
  return index


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  unknown = [n for n in FLAGS.only if n not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f'--only: unknown benchmark(s) {", ".join(unknown)}; '
                         f'valid: {", ".join(BENCHMARKS)}')
  if FLAGS.variants or FLAGS.scenarios:
    from benchmarks import federated_speed  # pylint: disable=g-import-not-at-top
    names = {s.name for s in federated_speed.scenarios(FLAGS.smoke)}
    names |= {'ml-100k', 'ml-1m'}  # pfedrec_speed's
    bad = [v for v in FLAGS.variants if v not in federated_speed.VARIANTS]
    bad += [s for s in FLAGS.scenarios if s not in names]
    if bad:
      raise app.UsageError(f'--variants/--scenarios: unknown {", ".join(bad)}; variants: '
                           f'{", ".join(federated_speed.VARIANTS)}; scenarios: {", ".join(sorted(names))}')
  data_dir = FLAGS.data_dir or default_data_dir()
  if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f'--data_dir={FLAGS.data_dir}: no such folder')
  index = run_all(FLAGS.out_dir, FLAGS.only or BENCHMARKS, FLAGS.smoke, data_dir, FLAGS.in_process)
  for name, row in index.items():
    print(f'{name}: {row["status"]} {row.get("json") or row.get("why") or ""} {row.get("error") or ""}')
  return 1 if any(r['status'] == 'failed' for r in index.values()) else 0


if __name__ == '__main__':
  app.run(main)
