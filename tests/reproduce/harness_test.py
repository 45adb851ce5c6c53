"""harness: resumable cells, failures, aggregation and the trivial-baseline check."""

import sys
import json
import os
import time

import pytest

from experiments.tables import harness


def _table(build, rows=None):
  rows = rows or [harness.RowSpec('trivial', kind=harness.TRIVIAL), harness.RowSpec('model'),
                  harness.RowSpec('paper', kind=harness.PUBLISHED, published={'rmse': 0.9})]
  return harness.TableSpec(name='t', title='T', description='d',
                           columns=[harness.Column('rmse', 'RMSE', lower_is_better=True)],
                           rows=rows, build_cells=build, check_metric='rmse')


def _cells(calls, values=None, fail=(), skip=()):
  values = values or {0: 1.0, 1: 1.2}

  def run(row, seed, ctx):
    calls.append((row, seed))
    if (row, seed) in fail:
      raise RuntimeError('boom')
    if (row, seed) in skip:
      raise harness.CellSkipped('skipped: module missing')
    value = 2.0 if row == 'trivial' else values[seed]
    return {row: {'rmse': value, 'note': 'x'}}

  def build(options):
    out = []
    for seed in options.seeds:
      for row in ('trivial', 'model'):
        out.append(harness.Cell(f'{row}-s{seed}', (row,), '', seed,
                                {'row': row, 'seed': seed, 'total_rounds': 3},
                                lambda ctx, r=row, s=seed: run(r, s, ctx)))
    return out

  return build


def test_finished_cells_are_saved_and_not_rerun(tmp_path):
  calls = []
  options = harness.RunOptions(output_dir=str(tmp_path), seeds=(0, 1))
  table = _table(_cells(calls))
  first = harness.run_table(table, options)
  assert first.ok and len(calls) == 4
  files = sorted(os.listdir(tmp_path / 'cells'))
  assert len(files) == 4 and all(f.endswith('.json') for f in files)
  record = json.loads((tmp_path / 'cells' / files[0]).read_text())
  assert record['status'] == 'done' and 'params_hash' in record

  calls.clear()
  second = harness.run_table(table, options)
  assert calls == [] and all(r.reused for r in second.results)
  assert second.rows[1].stats['rmse'] == first.rows[1].stats['rmse']


def test_changed_params_are_a_new_cell(tmp_path):
  calls = []
  harness.run_table(_table(_cells(calls)), harness.RunOptions(str(tmp_path), seeds=(0,)))
  calls.clear()
  harness.run_table(_table(_cells(calls)), harness.RunOptions(str(tmp_path), seeds=(0, 1)))
  assert sorted(calls) == [('model', 1), ('trivial', 1)]


def test_mean_and_sample_std_over_seeds(tmp_path):
  run = harness.run_table(_table(_cells([], values={0: 1.0, 1: 1.2, 2: 1.4})),
                          harness.RunOptions(str(tmp_path), seeds=(0, 1, 2)))
  model = next(r for r in run.rows if r.spec.label == 'model')
  assert model.stats['rmse'].mean == pytest.approx(1.2)
  assert model.stats['rmse'].std == pytest.approx(0.2)
  assert model.stats['rmse'].n == 3 and model.repeats == [0, 1, 2]
  assert model.values == {'note': 'x'}
  paper = next(r for r in run.rows if r.spec.label == 'paper')
  assert paper.status == harness.PUBLISHED and paper.stats == {}


def test_one_value_has_no_std():
  assert harness.summarize([0.5]) == harness.Stat(0.5, None, 1)


def test_a_failing_cell_does_not_stop_the_others_and_is_retried(tmp_path):
  calls = []
  options = harness.RunOptions(str(tmp_path), seeds=(0, 1))
  run = harness.run_table(_table(_cells(calls, fail={('model', 0)})), options)
  assert len(calls) == 4 and not run.ok
  assert any('model-s0 failed: RuntimeError: boom' in p for p in run.problems)
  model = next(r for r in run.rows if r.spec.label == 'model')
  assert model.status == 'partial' and model.repeats == [1]
  calls.clear()
  run = harness.run_table(_table(_cells(calls)), options)
  assert calls == [('model', 0)] and run.ok


def test_a_cell_that_cannot_run_fails_the_table_unless_skips_are_allowed(tmp_path):
  table = _table(_cells([], skip={('model', 0)}))
  run = harness.run_table(table, harness.RunOptions(str(tmp_path / 'strict'), seeds=(0,)))
  assert not run.ok
  assert run.problems == ['cell model-s0 could not run: skipped: module missing (--allow_skipped '
                          'accepts this in a draft; the row is then marked skipped)']
  draft = harness.run_table(table, harness.RunOptions(str(tmp_path / 'draft'), seeds=(0,),
                                                      allow_skipped=True))
  model = next(r for r in draft.rows if r.spec.label == 'model')
  assert model.status == harness.SKIPPED
  assert model.values['reason'] == 'skipped: module missing'
  assert draft.ok


def test_trivial_check(tmp_path):
  run = harness.run_table(_table(_cells([], values={0: 2.5})),
                          harness.RunOptions(str(tmp_path / 'q'), seeds=(0,), quick=True))
  assert run.problems == ['model: rmse 2.5000 does not beat trivial (2.0000)']
  full = harness.run_table(_table(_cells([], values={0: 2.5})),
                           harness.RunOptions(str(tmp_path / 'f'), seeds=(0,)))
  assert full.ok and full.warnings == run.problems
  exempt = _table(_cells([], values={0: 2.5}),
                  rows=[harness.RowSpec('trivial', kind=harness.TRIVIAL),
                        harness.RowSpec('model', beats_trivial_quick=False)])
  assert harness.run_table(exempt, harness.RunOptions(str(tmp_path), seeds=(0,), quick=True)).ok


def test_run_dir_ignores_rounds_but_result_does_not():
  make = lambda rounds: harness.Cell('c', ('r',), '', 0, {'a': 1, 'total_rounds': rounds},
                                     lambda ctx: {})
  assert make(5).run_hash == make(500).run_hash
  assert make(5).params_hash != make(500).params_hash
  assert harness.cell_run_dir('/o', make(5)) == harness.cell_run_dir('/o', make(500))


def test_select_cells_by_row_substring():
  build = _cells([])
  cells = build(harness.RunOptions('/o', seeds=(0,)))
  assert [c.name for c in harness.select_cells(cells, ['MOD'])] == ['model-s0']
  assert len(harness.select_cells(cells, [])) == 2


def test_duplicate_cell_names_are_rejected(tmp_path):
  cell = harness.Cell('same', ('r',), '', 0, {}, lambda ctx: {'r': {}})
  with pytest.raises(ValueError, match='duplicate cell names'):
    harness.run_cells([cell, cell], harness.RunOptions(str(tmp_path)))


def test_a_cell_returning_wrong_rows_fails(tmp_path):
  cell = harness.Cell('c', ('expected',), '', 0, {}, lambda ctx: {'other': {'rmse': 1.0}})
  [result] = harness.run_cells([cell], harness.RunOptions(str(tmp_path)))
  assert result.status == harness.FAILED and 'expected' in result.error


def test_rows_filter_without_the_trivial_row_is_not_a_problem(tmp_path):
  options = harness.RunOptions(str(tmp_path), seeds=(0,), rows=('model',))
  run = harness.run_table(_table(_cells([], values={0: 2.5})), options)
  assert run.ok and [r.cell.name for r in run.results] == ['model-s0']


def test_source_commit_is_read_before_the_cells_run(tmp_path, monkeypatch):
  """A commit made while cells run must not be recorded as the code that ran them."""
  commits = iter(['started-here', 'committed-meanwhile'])
  monkeypatch.setattr(harness.version, 'source_commit', lambda: next(commits))

  def build(options):
    def run(ctx):
      assert harness.version.source_commit() == 'committed-meanwhile'
      return {'trivial': {'rmse': 1.0}}
    return [harness.Cell('trivial-s0', ('trivial',), '', 0, {'x': 1}, run)]

  run = harness.run_table(_table(build, [harness.RowSpec('trivial', kind=harness.TRIVIAL)]),
                          harness.RunOptions(output_dir=str(tmp_path), seeds=(0,)))
  assert run.ok and run.source_commit == 'started-here'


def _data_table(loads):
  """Two cells: `a` reads data set A, `b` reads A and B (through the shared cache)."""

  def build(options):
    def run(ctx, names, row):
      for name in names:
        loads.append(name)
        ctx.cached(('ds', name), lambda n=name: f'contents of {n}')
      return {row: {'rmse': 1.0 if row == 'trivial' else 0.5}}
    return [harness.Cell('a', ('trivial',), '', 0, {'x': 1}, lambda ctx: run(ctx, ['A'], 'trivial')),
            harness.Cell('b', ('model',), '', 0, {'x': 2}, lambda ctx: run(ctx, ['A', 'B'], 'model'))]

  return _table(build, [harness.RowSpec('trivial', kind=harness.TRIVIAL), harness.RowSpec('model')])


def _describe(used):
  return [{'dataset': key[1], 'checksum': value[-1]} for key, value in sorted(used.items())]


def test_cells_record_their_machine_and_only_the_data_they_read(tmp_path):
  options = harness.RunOptions(output_dir=str(tmp_path), seeds=(0,))
  run = harness.run_table(_data_table([]), options, describe_data=_describe)
  by_name = {r.cell.name: r for r in run.results}
  # Cell a loaded A only, although b's data sits in the same cache afterwards.
  assert by_name['a'].data == [{'dataset': 'A', 'checksum': 'A'}]
  assert by_name['b'].data == [{'dataset': 'A', 'checksum': 'A'}, {'dataset': 'B', 'checksum': 'B'}]
  assert run.data == [{'dataset': 'A', 'checksum': 'A'}, {'dataset': 'B', 'checksum': 'B'}]
  assert run.data_unrecorded == 0
  cores = harness.version.machine_info()['cores']
  assert [(n, k) for n, k, _ in run.machines()] == [
      (f'{harness.version.machine_info()["cpu"]}, {cores} cores', 2)]
  saved = json.loads((tmp_path / 'cells' / f'{by_name["b"].cell.key}.json').read_text())
  assert saved['machine']['cores'] == cores and len(saved['data']) == 2

  # A rerun reuses every cell and loads nothing, yet still knows the data and machines.
  loads = []
  again = harness.run_table(_data_table(loads), options, describe_data=_describe)
  assert loads == [] and all(r.reused for r in again.results)
  assert again.data == run.data and again.machines()[0][1] == 2


def test_cells_saved_before_provenance_records_still_load(tmp_path):
  options = harness.RunOptions(output_dir=str(tmp_path), seeds=(0,))
  run = harness.run_table(_data_table([]), options, describe_data=_describe)
  old = tmp_path / 'cells' / f'{run.results[0].cell.key}.json'
  record = json.loads(old.read_text())
  del record['machine'], record['data']
  old.write_text(json.dumps(record))
  again = harness.run_table(_data_table([]), options, describe_data=_describe)
  assert all(r.reused for r in again.results)
  assert again.results[0].machine is None and again.results[0].data is None
  assert again.data_unrecorded == 1
  assert again.data == run.results[1].data  # from the cell that kept its record
  assert sorted(k for _, k, _ in again.machines()) == [1, 1]
  assert (None, 1, again.results[0].seconds) in again.machines()


def test_attempt_clock_saves_while_running_and_resumes(tmp_path):
  run_dir = tmp_path / 'run'
  now = [100.0]
  clock = harness.AttemptClock(str(run_dir), interval=3600, clock=lambda: now[0])
  now[0] += 5.0
  clock.save()
  assert not run_dir.exists()  # Nothing is written before the cell makes its run directory.
  run_dir.mkdir()
  now[0] += 3.0
  clock.save()  # What the clock's thread does every `interval` seconds.
  assert json.loads((run_dir / harness.SECONDS_FILE).read_text())['seconds'] == 8.0
  now[0] += 1.0
  assert clock.stop() == 9.0 and clock.stop() == 9.0  # idempotent
  now[0] += 50.0  # Time between attempts does not count.
  again = harness.AttemptClock(str(run_dir), interval=3600, clock=lambda: now[0])
  now[0] += 2.0
  assert again.total() == 11.0
  assert again.stop() == 11.0


def test_attempt_clock_saves_from_its_thread(tmp_path):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  clock = harness.AttemptClock(str(run_dir), interval=0.01, clock=lambda: 42.0)
  path = run_dir / harness.SECONDS_FILE
  deadline = time.monotonic() + 30
  while not path.exists():  # Waits for the thread's first save (no fixed sleep).
    assert time.monotonic() < deadline, 'the clock thread never saved'
    time.sleep(0.005)
  clock.stop()
  assert json.loads(path.read_text())['seconds'] == 0.0


def test_an_interrupted_cell_counts_the_time_of_every_attempt(tmp_path, monkeypatch):
  attempts = []
  now = [1000.0]
  real_clock = harness.AttemptClock
  monkeypatch.setattr(harness, 'AttemptClock',
                      lambda run_dir: real_clock(run_dir, interval=3600, clock=lambda: now[0]))

  def run(ctx):
    attempts.append(1)
    os.makedirs(ctx.run_dir, exist_ok=True)
    now[0] += 30.0  # the cell's work
    if len(attempts) == 1:
      raise RuntimeError('interrupted')
    return {'trivial': {'rmse': 1.0}}

  table = _table(lambda options: [harness.Cell('c', ('trivial',), '', 0, {'x': 1}, run)],
                 [harness.RowSpec('trivial', kind=harness.TRIVIAL)])
  options = harness.RunOptions(output_dir=str(tmp_path), seeds=(0,))
  first = harness.run_table(table, options)
  assert first.results[0].status == harness.FAILED
  assert first.results[0].seconds == 30.0
  second = harness.run_table(table, options)
  assert second.results[0].status == harness.DONE
  assert second.results[0].seconds == 60.0


def test_cells_without_a_run_directory_leave_none(tmp_path):
  table = _table(_cells([]))
  harness.run_table(table, harness.RunOptions(output_dir=str(tmp_path), seeds=(0,)))
  assert not (tmp_path / 'runs').exists()


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
