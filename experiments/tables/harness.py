"""Runs the cells of a reproduction table, resumably, and aggregates them.

A table (`TableSpec`, defined in `tables.py`) is a list of rows; each row is
measured by cells (`Cell`), one per repetition (a seed, or a fold). A cell
returns metrics for one or more rows (e.g. FedAvg with and without
fine-tuning come from one training run). `run_table`:

* runs every cell not finished before and saves its result as JSON
  (`cells/<key>-<hash>.json`, written atomically) as soon as it is done; the
  hash covers everything that defines the result (`Cell.params`), so a
  changed setting (or `--quick`) is a different cell and never reuses a stale
  result;
* gives federated cells a run directory (`runs/<key>-<hash>`) whose hash
  leaves out the number of rounds: `run_federated` resumes from its latest
  checkpoint there, after an interruption or when a round cap is raised;
* records failures (the other cells still run) and skipped cells (a missing
  optional module), which are retried on the next run;
* aggregates the repetitions of each row into mean, standard deviation
  (ddof=1) and count per metric.

Rendering (CSV, Markdown, PNG) is `report.py`'s job.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging

from tff_rec import version
from tff_rec.training import artifacts

# Row kinds.
TRIVIAL = 'trivial'  # a trivial predictor (global mean, popularity)
OURS = 'ours'  # measured here
PUBLISHED = 'published'  # only published numbers (no cells)

DONE = 'done'
FAILED = 'failed'
SKIPPED = 'skipped'

# Cache entries a cell used (key -> loaded value) -> provenance records (JSON-ready).
DataDescriber = Callable[[Mapping[Any, Any]], list]


class CellSkipped(Exception):
  """Raised by a cell that cannot run here (e.g. an optional module is missing)."""


@dataclasses.dataclass(frozen=True)
class Column:
  """A metric shown in the table."""

  key: str  # metric name in the cell results
  header: str
  digits: int = 4
  lower_is_better: bool = False


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """One row: our measurement and/or published numbers.

  `published` maps a Column key to the published value (`source` says
  where it is from). The trivial-baseline check compares each `OURS` row
  with the `TRIVIAL` row of the same setting on the table's `check_metric`;
  `beats_trivial_quick=False` exempts a row in `--quick` mode (e.g. a
  federated model after two rounds).
  """

  label: str
  setting: str = ''
  kind: str = OURS
  published: Mapping[str, float] = dataclasses.field(default_factory=dict)
  source: str = ''
  beats_trivial_quick: bool = True


@dataclasses.dataclass
class RunOptions:
  """What a table run is asked to do (the flags of experiments/reproduce.py)."""

  output_dir: str
  seeds: tuple[int, ...] = (0, 1, 2)
  quick: bool = False
  max_rounds: Optional[int] = None  # cap on federated rounds (None: no cap)
  max_epochs: Optional[int] = None  # cap on the NCF table's central epochs (None: no cap)
  data_dir: Optional[str] = None  # a folder holding ml-100k.zip, ml-1m.zip, ncf-ml-1m.zip
  data_paths: Mapping[str, str] = dataclasses.field(default_factory=dict)  # per data set
  rows: tuple[str, ...] = ()  # only rows whose label contains one of these
  progress_bar: bool = False
  # A cell that can't run (e.g. a missing optional module) fails the table
  # unless this is set (drafts); the row is then marked skipped, with the reason.
  allow_skipped: bool = False


@dataclasses.dataclass(frozen=True)
class Cell:
  """One unit of work: `run(ctx)` returns `{row label: {metric: value}}`."""

  name: str  # unique within the table, e.g. 'ml1m-mf-fold3'
  rows: tuple[str, ...]
  setting: str
  repeat: int  # the seed or fold this cell is
  params: Mapping[str, Any]  # everything that defines the result
  run: Callable[['CellContext'], Mapping[str, Mapping[str, Any]]]
  # Keys of `params` left out of the run directory's hash (e.g. rounds, so
  # a longer run resumes from a shorter one's checkpoint).
  resumable_keys: tuple[str, ...] = ('total_rounds',)

  @property
  def params_hash(self) -> str:
    return _hash(self.params)

  @property
  def run_hash(self) -> str:
    return _hash({k: v for k, v in self.params.items() if k not in self.resumable_keys})

  @property
  def key(self) -> str:
    return f'{_slug(self.name)}-{self.params_hash}'


@dataclasses.dataclass
class CellContext:
  """What a running cell gets: where to write, the options, a shared cache."""

  cell: Cell
  options: RunOptions
  run_dir: str
  cache: dict
  used: set = dataclasses.field(default_factory=set)  # the cache keys this cell asked for

  def cached(self, key: Any, make: Callable[[], Any]) -> Any:
    """`make()` once per process for `key` (loaded data, splits)."""
    self.used.add(key)
    if key not in self.cache:
      self.cache[key] = make()
    return self.cache[key]


@dataclasses.dataclass
class CellResult:
  """A finished (or failed / skipped) cell."""

  cell: Cell
  status: str
  metrics: Mapping[str, Mapping[str, Any]]  # row -> metrics
  seconds: float
  reused: bool = False  # read back from an earlier run
  error: str = ''
  finished_at: str = ''
  machine: Optional[Mapping[str, Any]] = None  # where it ran (None: not recorded)
  data: Optional[list[dict]] = None  # the data sets it read (None: not recorded)


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean, standard deviation (None for one value) and count of a metric."""

  mean: float
  std: Optional[float]
  n: int


@dataclasses.dataclass
class RowResult:
  """A row of the final table."""

  spec: RowSpec
  stats: dict[str, Stat]  # metric -> Stat over repetitions
  values: dict[str, Any]  # non-numeric metrics (first repetition's)
  repeats: list[int]
  seconds: float
  status: str  # done / failed / skipped / partial / published / not run


@dataclasses.dataclass
class TableSpec:
  """A table: rows, columns, cells, published numbers and notes."""

  name: str
  title: str
  description: str
  columns: list[Column]
  rows: list[RowSpec]
  build_cells: Callable[[RunOptions], list[Cell]]
  check_metric: str  # the metric on which ours must beat the trivial row
  repeat_label: str = 'seed'
  notes: list[str] = dataclasses.field(default_factory=list)
  plot: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  default_quick_seeds: tuple[int, ...] = (0,)

  def row(self, label: str, setting: str = '') -> RowSpec:
    for r in self.rows:
      if r.label == label and r.setting == setting:
        return r
    raise KeyError(f'{self.name}: no row {label!r} in setting {setting!r}')

  @property
  def check_column(self) -> Column:
    return next(c for c in self.columns if c.key == self.check_metric)


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')[:80]


def _canonical(value: Any) -> Any:
  """JSON-ready form of params (dataclasses, tuples, numpy scalars)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return _canonical(dataclasses.asdict(value))
  if isinstance(value, Mapping):
    return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  if isinstance(value, (list, tuple)):
    return [_canonical(v) for v in value]
  if hasattr(value, 'item') and callable(value.item):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  return value


def config_params(value: Any) -> Any:
  """A config as cell params: every dataclass field at its default value is left out.

  So a new config field whose default keeps the old behaviour leaves every
  existing cell hash (and committed result) valid, while any setting that
  differs from a default is hashed. Changing a default therefore changes what
  hashes mean: `tests/reproduce/tables_test.py` pins the defaults.
  """
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    out = {}
    for field in dataclasses.fields(value):
      v = getattr(value, field.name)
      if field.default is not dataclasses.MISSING:
        default = field.default
      elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
      else:
        default = dataclasses.MISSING
      if default is not dataclasses.MISSING and _canonical(v) == _canonical(default):
        continue
      out[field.name] = config_params(v)
    return out
  if isinstance(value, Mapping):
    return {k: config_params(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [config_params(v) for v in value]
  return value


def _hash(params: Mapping[str, Any]) -> str:
  text = json.dumps(_canonical(params), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def cells_dir(output_dir: str) -> str:
  return os.path.join(output_dir, 'cells')


def cell_path(output_dir: str, cell: Cell) -> str:
  return os.path.join(cells_dir(output_dir), f'{cell.key}.json')


def cell_run_dir(output_dir: str, cell: Cell) -> str:
  """The cell's training run directory (checkpoints survive a rerun)."""
  return os.path.join(output_dir, 'runs', f'{_slug(cell.name)}-{cell.run_hash}')


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def load_finished(output_dir: str, cell: Cell) -> Optional[CellResult]:
  """The saved result of a finished cell with the same params, if any."""
  path = cell_path(output_dir, cell)
  if not os.path.exists(path):
    return None
  try:
    record = artifacts.read_json(path)
  except (OSError, ValueError) as e:
    logging.warning('Ignoring unreadable cell result %s (%s); rerunning it', path, e)
    return None
  if record.get('status') != DONE or record.get('params_hash') != cell.params_hash:
    return None
  return CellResult(cell, DONE, record['metrics'], float(record.get('seconds', 0.0)),
                    reused=True, finished_at=record.get('finished_at', ''),
                    machine=record.get('machine'), data=record.get('data'))


def save_finished(output_dir: str, result: CellResult) -> str:
  """Writes a finished cell's JSON atomically; returns its path."""
  cell = result.cell
  path = cell_path(output_dir, cell)
  artifacts.write_json(path, {
      'name': cell.name,
      'rows': list(cell.rows),
      'setting': cell.setting,
      'repeat': cell.repeat,
      'status': result.status,
      'params': _canonical(cell.params),
      'params_hash': cell.params_hash,
      'metrics': _canonical(result.metrics),
      'seconds': result.seconds,
      'finished_at': result.finished_at,
      'machine': result.machine,
      'data': result.data,
  })
  return path


def select_cells(cells: Sequence[Cell], rows: Sequence[str]) -> list[Cell]:
  """The cells producing a row whose label contains one of `rows` (all if empty)."""
  if not rows:
    return list(cells)
  wanted = [r.lower() for r in rows]
  return [c for c in cells if any(w in row.lower() for row in c.rows for w in wanted)]


def run_cells(cells: Sequence[Cell], options: RunOptions,
              on_result: Optional[Callable[[CellResult], None]] = None,
              cache: Optional[dict] = None,
              describe_data: Optional[DataDescriber] = None) -> list[CellResult]:
  """Runs (or reuses) every cell in order; never raises for a failing cell.

  `cache` is shared by the cells (loaded data, splits); a fresh one by default.
  `describe_data` turns the cache entries a cell used into the provenance
  records saved with it (none are saved without it).
  """
  names = [c.name for c in cells]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f'duplicate cell names: {dupes}')
  cache = {} if cache is None else cache
  results = []
  for k, cell in enumerate(cells):
    prefix = f'[{k + 1}/{len(cells)}] {cell.name}'
    result = load_finished(options.output_dir, cell)
    if result is not None:
      logging.info('%s: finished before (%.0fs), reusing %s', prefix, result.seconds,
                   cell_path(options.output_dir, cell))
      print(f'{prefix}: done before ({result.seconds:.0f}s)', flush=True)
    else:
      result = _run_one(cell, options, cache, describe_data)
      print(f'{prefix}: {result.status} ({result.seconds:.0f}s)'
            + (f': {result.error.splitlines()[-1] if result.error else ""}'
               if result.status != DONE else ''), flush=True)
    results.append(result)
    if on_result is not None:
      on_result(result)
  return results


SECONDS_FILE = 'harness_seconds.json'  # in a cell's run directory
CLOCK_INTERVAL = 30.0  # seconds between saves of a running cell's time


class AttemptClock:
  """Seconds spent on a cell, summed over attempts that resumed its run directory.

  While the cell runs, the total is saved every `interval` seconds into the run
  directory (once the cell has created it), so an interrupted attempt's time
  (up to the last save) counts when a later attempt resumes from its checkpoint.
  """

  def __init__(self, run_dir: str, interval: Optional[float] = None,
               clock: Callable[[], float] = time.time):
    self._path = os.path.join(run_dir, SECONDS_FILE)
    self._clock = clock
    self._before = self._read()
    self._started = clock()
    self._final: Optional[float] = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True,
                                    args=(CLOCK_INTERVAL if interval is None else interval,))
    self._thread.start()

  def _read(self) -> float:
    try:
      return float(artifacts.read_json(self._path)['seconds'])
    except (OSError, ValueError, KeyError, TypeError):
      return 0.0

  def total(self) -> float:
    return self._final if self._final is not None else self._before + self._clock() - self._started

  def save(self) -> None:
    """Saves the total so far (once the run directory exists)."""
    if os.path.isdir(os.path.dirname(self._path)):
      artifacts.write_json(self._path, {'seconds': self.total()})

  def _loop(self, interval: float) -> None:
    while not self._stop.wait(interval):
      try:
        self.save()
      except OSError as e:  # A full disk must not kill the cell.
        logging.warning('could not save %s: %s', self._path, e)

  def stop(self) -> float:
    """Stops the clock, saves and returns the total (idempotent)."""
    if self._final is None:
      self._stop.set()
      self._thread.join()
      self._final = self.total()
      try:
        self.save()
      except OSError as e:
        logging.warning('could not save %s: %s', self._path, e)
    return self._final


def _run_one(cell: Cell, options: RunOptions, cache: dict,
             describe_data: Optional[DataDescriber]) -> CellResult:
  run_dir = cell_run_dir(options.output_dir, cell)
  ctx = CellContext(cell, options, run_dir, cache)
  clock = AttemptClock(run_dir)
  try:
    metrics = cell.run(ctx)
  except CellSkipped as e:
    return CellResult(cell, SKIPPED, {}, clock.stop(), error=str(e), finished_at=_now())
  except Exception as e:  # pylint: disable=broad-except
    logging.error('cell %s failed:\n%s', cell.name, traceback.format_exc())
    return CellResult(cell, FAILED, {}, clock.stop(),
                      error=f'{type(e).__name__}: {e}', finished_at=_now())
  finally:
    clock.stop()
  missing = sorted(set(cell.rows) - set(metrics))
  extra = sorted(set(metrics) - set(cell.rows))
  if missing or extra:
    return CellResult(cell, FAILED, {}, clock.stop(),
                      error=f'cell returned rows {sorted(metrics)}, expected {list(cell.rows)}',
                      finished_at=_now())
  data = None
  if describe_data is not None:
    data = describe_data({k: cache[k] for k in ctx.used if k in cache})
  result = CellResult(cell, DONE, {r: dict(m) for r, m in metrics.items()},
                      clock.stop(), finished_at=_now(),
                      machine=version.machine_info(), data=data)
  save_finished(options.output_dir, result)
  return result


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(values: Sequence[float]) -> Stat:
  """Mean, sample standard deviation (None for fewer than 2) and count."""
  n = len(values)
  if not all(math.isfinite(v) for v in values):
    return Stat(sum(values) / n, None, n)  # inf (e.g. epsilon without noise) or nan.
  mean = math.fsum(values) / n
  std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return Stat(mean, std, n)


def aggregate(table: TableSpec, results: Sequence[CellResult]) -> list[RowResult]:
  """One RowResult per row of the table, in the table's order."""
  rows = []
  for spec in table.rows:
    if spec.kind == PUBLISHED:
      rows.append(RowResult(spec, {}, {}, [], 0.0, PUBLISHED))
      continue
    mine = [r for r in results if r.cell.setting == spec.setting and spec.label in r.cell.rows]
    done = [r for r in mine if r.status == DONE]
    per_metric: dict[str, list[float]] = {}
    values: dict[str, Any] = {}
    for r in done:
      for k, v in r.metrics[spec.label].items():
        if _is_number(v):
          per_metric.setdefault(k, []).append(float(v))
        else:
          values.setdefault(k, v)
    stats = {k: summarize(v) for k, v in per_metric.items()}
    if not mine:
      status = 'not run'
    elif len(done) == len(mine):
      status = DONE
    elif not done:
      status = FAILED if any(r.status == FAILED for r in mine) else SKIPPED
      reasons = sorted({r.error for r in mine if r.error})
      if reasons:
        values.setdefault('reason', '; '.join(reasons))
    else:
      status = 'partial'
    rows.append(RowResult(spec, stats, values, sorted(r.cell.repeat for r in done),
                          sum(r.seconds for r in mine), status))
  return rows


def trivial_check(table: TableSpec, rows: Sequence[RowResult], quick: bool) -> list[str]:
  """Rows that should beat their setting's trivial row but do not (messages)."""
  column = table.check_column
  trivial = {r.spec.setting: r for r in rows if r.spec.kind == TRIVIAL}
  problems = []
  for r in rows:
    if r.spec.kind != OURS or r.status not in (DONE, 'partial'):
      continue
    if quick and not r.spec.beats_trivial_quick:
      continue
    base = trivial.get(r.spec.setting)
    if base is not None and base.status == 'not run':
      continue  # The trivial row was filtered out (--rows): nothing to compare with.
    if base is None or column.key not in base.stats:
      problems.append(f'{r.spec.label}: no trivial row to compare with')
      continue
    if column.key not in r.stats:
      problems.append(f'{r.spec.label}: no {column.key}')
      continue
    ours, ref = r.stats[column.key].mean, base.stats[column.key].mean
    better = ours < ref if column.lower_is_better else ours > ref
    if not better:
      problems.append(f'{r.spec.setting + ": " if r.spec.setting else ""}{r.spec.label}: '
                      f'{column.key} {ours:.4f} does not beat {base.spec.label} ({ref:.4f})')
  return problems


def beats_trivial(table: TableSpec, rows: Sequence[RowResult]) -> dict[tuple[str, str], Optional[bool]]:
  """(setting, label) -> whether the row beats its trivial row (None: n/a)."""
  column = table.check_column
  trivial = {r.spec.setting: r for r in rows if r.spec.kind == TRIVIAL}
  out = {}
  for r in rows:
    base = trivial.get(r.spec.setting)
    if (r.spec.kind != OURS or base is None or column.key not in r.stats
        or column.key not in base.stats):
      out[(r.spec.setting, r.spec.label)] = None
      continue
    ours, ref = r.stats[column.key].mean, base.stats[column.key].mean
    out[(r.spec.setting, r.spec.label)] = ours < ref if column.lower_is_better else ours > ref
  return out


@dataclasses.dataclass
class TableRun:
  """Everything one invocation produced for a table."""

  cells: list[Cell]
  results: list[CellResult]
  rows: list[RowResult]
  problems: list[str]  # failed cells (and, in quick mode, rows not beating the trivial row)
  started_at: str
  finished_at: str
  wall_seconds: float
  # Full runs: rows not beating the trivial row are findings, not errors.
  warnings: list[str] = dataclasses.field(default_factory=list)
  # The commit checked out when the run started: the code it ran, whatever is committed meanwhile.
  source_commit: Optional[str] = None

  @property
  def data(self) -> list[dict]:
    """The data sets the finished cells recorded reading (new and reused), each once."""
    seen, out = set(), []
    for r in self.results:
      for record in (r.data or []) if r.status == DONE else []:
        key = json.dumps(record, sort_keys=True, default=str)
        if key not in seen:
          seen.add(key)
          out.append(record)
    return out

  @property
  def data_unrecorded(self) -> int:
    """Finished cells without a data record (saved by older code, or no describer)."""
    return sum(1 for r in self.results if r.status == DONE and r.data is None)

  def machines(self) -> list[tuple[Optional[str], int, float]]:
    """(machine summary or None if not recorded, finished cells, their seconds), most cells first."""
    groups: dict[Optional[str], list[float]] = {}
    for r in self.results:
      if r.status != DONE:
        continue
      m = r.machine
      name = f'{m.get("cpu")}, {m.get("cores")} cores' if m else None
      groups.setdefault(name, []).append(r.seconds)
    return sorted(((k, len(v), sum(v)) for k, v in groups.items()), key=lambda g: -g[1])

  @property
  def ok(self) -> bool:
    return not self.problems


def run_table(table: TableSpec, options: RunOptions,
              on_result: Optional[Callable[[CellResult], None]] = None,
              describe_data: Optional[DataDescriber] = None) -> TableRun:
  """Builds, filters and runs the table's cells; aggregates and checks the rows.

  `describe_data` (e.g. `common.data_sources`) records, with each cell, where the
  data it read came from.
  """
  started, started_at, commit = time.time(), _now(), version.source_commit()
  cells = select_cells(table.build_cells(options), options.rows)
  if not cells:
    raise ValueError(f'{table.name}: no cells match rows {list(options.rows)}')
  results = run_cells(cells, options, on_result, describe_data=describe_data)
  rows = aggregate(table, results)
  problems = [f'cell {r.cell.name} failed: {r.error}' for r in results if r.status == FAILED]
  if not options.allow_skipped:
    problems += [f'cell {r.cell.name} could not run: {r.error} (--allow_skipped accepts this '
                 'in a draft; the row is then marked skipped)'
                 for r in results if r.status == SKIPPED]
  below_trivial = trivial_check(table, rows, options.quick)
  # In --quick mode (the CI smoke test) a model below the trivial row is an error; in a full
  # run it is a result to report (e.g. the TFF tutorial's 20 rounds), not a failure.
  warnings = [] if options.quick else below_trivial
  if options.quick:
    problems += below_trivial
  return TableRun(cells, results, rows, problems, started_at, _now(), time.time() - started,
                  warnings, commit)
