"""Writes a table's results: CSV, Markdown, a PNG plot and manifest.json (all atomic).

The Markdown shows our numbers (mean ± std over repetitions) beside the
published ones, whether each model beats the table's trivial predictor, the
notes on where we differ from the paper, the machine (cores, RAM, CPU) and
the wall time.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Mapping, Optional, Sequence

from tff_rec import atomic
from tff_rec import version
from experiments.tables import harness

CSV_NAME = 'table.csv'
MARKDOWN_NAME = 'table.md'
PLOT_NAME = 'table.png'
MANIFEST_NAME = 'manifest.json'


def _fmt(value: Optional[float], digits: int) -> str:
  if value is None:
    return ''
  if isinstance(value, float) and math.isinf(value):
    return '∞'
  if digits == 0:
    return f'{value:,.0f}'
  return f'{value:.{digits}f}'


def _cell_text(row: harness.RowResult, column: harness.Column) -> str:
  stat = row.stats.get(column.key)
  if stat is None:
    return '—'
  text = _fmt(stat.mean, column.digits)
  if stat.std is not None:
    text += f' ± {_fmt(stat.std, column.digits)}'
  return text


def _published_text(row: harness.RowResult, column: harness.Column) -> str:
  value = row.spec.published.get(column.key)
  return _fmt(value, column.digits) if value is not None else ''


def _visible_columns(table: harness.TableSpec, rows: Sequence[harness.RowResult],
                     setting: str) -> list[harness.Column]:
  """Columns with a value in some row of the setting."""
  mine = [r for r in rows if r.spec.setting == setting]
  return [c for c in table.columns
          if any(c.key in r.stats or c.key in r.spec.published for r in mine)]


def to_csv(table: harness.TableSpec, rows: Sequence[harness.RowResult],
           beats: Mapping[tuple[str, str], Optional[bool]]) -> str:
  """One line per row: every metric's mean, std and n, the published values."""
  metrics = []
  for c in table.columns:
    if c.key not in metrics:
      metrics.append(c.key)
  for r in rows:
    for k in sorted(r.stats):
      if k not in metrics:
        metrics.append(k)
  fields = ['table', 'setting', 'row', 'kind', 'status', table.repeat_label + 's', 'seconds',
            f'beats_trivial_{table.check_metric}']
  for k in metrics:
    fields += [f'{k}_mean', f'{k}_std', f'{k}_n', f'{k}_published']
  fields += ['published_source', 'notes']
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=fields, lineterminator='\n')
  writer.writeheader()
  for r in rows:
    line = {'table': table.name, 'setting': r.spec.setting, 'row': r.spec.label,
            'kind': r.spec.kind, 'status': r.status,
            table.repeat_label + 's': ' '.join(str(x) for x in r.repeats),
            'seconds': f'{r.seconds:.1f}' if r.seconds else '',
            f'beats_trivial_{table.check_metric}': _yes_no(beats.get((r.spec.setting, r.spec.label))),
            'published_source': r.spec.source,
            'notes': '; '.join(f'{k}={v}' for k, v in r.values.items())}
    for k in metrics:
      stat = r.stats.get(k)
      line[f'{k}_mean'] = repr(stat.mean) if stat else ''
      line[f'{k}_std'] = repr(stat.std) if stat and stat.std is not None else ''
      line[f'{k}_n'] = stat.n if stat else ''
      pub = r.spec.published.get(k)
      line[f'{k}_published'] = repr(pub) if pub is not None else ''
    writer.writerow(line)
  return out.getvalue()


def _yes_no(v: Optional[bool]) -> str:
  return '' if v is None else ('yes' if v else 'no')


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h {m:02d}m {s:02d}s' if h else (f'{m}m {s:02d}s' if m else f'{s}s')


def _cap_note(table: harness.TableSpec, run: Mapping[str, Any]) -> str:
  """A sentence naming the --max_rounds / --max_epochs caps the table's columns show."""
  keys = {c.key for c in table.columns}
  caps = []
  if run.get('max_rounds') and 'rounds' in keys:
    caps.append(f'federated rows ran at most {run["max_rounds"]} rounds (--max_rounds)')
  if run.get('max_epochs') and 'epochs' in keys:
    caps.append(f'central rows ran at most {run["max_epochs"]} epochs (--max_epochs)')
  if not caps:
    return ''
  return ('**Caps:** ' + '; '.join(caps) + '. Where the description above names more, the cap '
          'applies; the "run" columns give what each row ran.')


def to_markdown(table: harness.TableSpec, rows: Sequence[harness.RowResult],
                beats: Mapping[tuple[str, str], Optional[bool]], run: Mapping[str, Any]) -> str:
  """The table as Markdown: ours beside published, notes, machine, wall time."""
  lines = [f'# {table.title}', '', table.description, '']
  caps = _cap_note(table, run)
  if caps:
    lines += [caps, '']
  if run.get('quick'):
    lines += ['**Quick mode** (smoke test: few rounds/epochs/users); these numbers are not '
              'comparable with the papers.', '']
  rep = table.repeat_label
  lines += [f'Repetitions: {rep}s {", ".join(str(s) for s in run["repeats"])}; ours = mean ± '
            f'std (ddof=1) over {rep}s. "beats trivial" compares {table.check_column.header} '
            'with the trivial row of the same setting.', '']
  settings = []
  for r in table.rows:
    if r.setting not in settings:
      settings.append(r.setting)
  for setting in settings:
    mine = [r for r in rows if r.spec.setting == setting]
    columns = _visible_columns(table, rows, setting)
    if setting:
      lines += [f'## {setting}', '']
    header = ['row']
    for c in columns:
      header.append(c.header)
      if any(c.key in r.spec.published for r in mine):
        header.append(f'{c.header} (published)')
    header += ['beats trivial', 'n', 'time']
    lines.append('| ' + ' | '.join(header) + ' |')
    lines.append('|' + '---|' * len(header))
    for r in mine:
      cells = [r.spec.label + (' ¹' if r.spec.source else '')]
      for c in columns:
        cells.append(_cell_text(r, c) if r.spec.kind != harness.PUBLISHED else '')
        if any(c.key in x.spec.published for x in mine):
          cells.append(_published_text(r, c))
      status = '' if r.status in (harness.DONE, harness.PUBLISHED) else f' ({r.status})'
      cells.append(_yes_no(beats.get((r.spec.setting, r.spec.label))) + status)
      cells.append(str(len(r.repeats)) if r.spec.kind != harness.PUBLISHED else '')
      cells.append(_duration(r.seconds) if r.seconds else '')
      lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
    reasons = [f'- {r.spec.label}: {r.values["reason"]}' for r in mine if 'reason' in r.values]
    if reasons:
      lines += ['Not measured:'] + reasons + ['']
  sources = sorted({r.source for r in table.rows if r.source})
  if sources:
    lines += ['¹ Published numbers: ' + '; '.join(sources) + '.', '']
  if table.notes:
    lines += ['## Differences from the papers', ''] + [f'- {n}' for n in table.notes] + ['']
  if run.get('problems'):
    lines += ['## Checks that failed', ''] + [f'- {p}' for p in run['problems']] + ['']
  if run.get('warnings'):
    lines += ['## Rows below the trivial predictor', ''] + [f'- {p}' for p in run['warnings']] + ['']
  m = run['machine']
  lines += [
      '## Run', '',
      f'- Command: `{run["command"]}`',
      f'- Machine of this invocation: {m.get("cores")} cores, {m.get("ram_gb")} GB RAM, '
      f'{m.get("cpu")}; {m.get("platform")}; Python {m.get("python")}',
  ]
  if run.get('cell_machines'):
    lines.append('- Cells ran on: ' + '; '.join(
        f'{name or "no record (older cells did not keep one)"}: '
        f'{n} cell{"s" if n != 1 else ""}, {_duration(seconds)}'
        for name, n, seconds in run['cell_machines']))
  if run.get('data') or run.get('data_unrecorded'):
    parts = [_data_line(d) for d in run.get('data', [])]
    if run.get('data_unrecorded'):
      n = run['data_unrecorded']
      parts.append(f'no record for {n} cell{"s" if n != 1 else ""} (older cells did not keep one)')
    lines.append('- Data: ' + '; '.join(parts))
  lines += [
      '- Versions: ' + ', '.join(f'{k} {v}' for k, v in run['versions'].items()),
      f'- Source (at the start of this invocation): {run.get("commit") or "unknown"}',
      f'- Wall time of this invocation: {_duration(run["wall_seconds"])}; compute time of all '
      f'cells (including cells finished by earlier invocations): {_duration(run["cell_seconds"])}',
      f'- Cells: {run["counts"]}',
      '',
  ]
  return '\n'.join(lines)


def _data_line(record: Mapping[str, Any]) -> str:
  """One data provenance record as text."""
  text = f'{record.get("dataset")} from {record.get("path") or record.get("origin")}'
  if record.get('checksum'):
    verified = 'verified' if record.get('checksum_verified') else 'not verified'
    text += f' (sha256 {str(record["checksum"])[:12]}…, {verified})'
  return text


def plot_png(table: harness.TableSpec, rows: Sequence[harness.RowResult]) -> bytes:
  """The table's plot (bars of metrics per row, or metric-vs-metric scatter)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  spec = dict(table.plot)
  kind = spec.get('kind', 'bars')
  if kind == 'bars':
    settings = spec.get('settings') or ['']
    metrics = spec['metrics']
    fig, axes = plt.subplots(len(metrics), len(settings), squeeze=False,
                             figsize=(5.5 * len(settings), 3.2 * len(metrics) + 1.5))
    for j, setting in enumerate(settings):
      mine = [r for r in rows if r.spec.setting == setting]
      for i, metric in enumerate(metrics):
        _bars(axes[i][j], mine, metric, setting)
  elif kind == 'scatter':
    fig, ax = plt.subplots(figsize=(11, 5))
    _scatter(ax, rows, spec['x'], spec['y'], spec.get('logx', False))
  else:  # scatter_panels
    panels = spec['panels']
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(10 * len(panels), 5))
    for ax, panel in zip(axes[0], panels):
      mine = [r for r in rows if r.spec.setting == panel['setting']]
      _scatter(ax, mine, panel['x'], panel['y'], panel.get('logx', False))
      ax.set_title(panel['setting'], fontsize=9)
  fig.suptitle(table.title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  plt.close(fig)
  return buf.getvalue()


def _bars(ax, rows: Sequence[harness.RowResult], metric: str, setting: str) -> None:
  labels, ours, errs, published = [], [], [], []
  for r in rows:
    stat = r.stats.get(metric)
    pub = r.spec.published.get(metric)
    if stat is None and pub is None:
      continue
    labels.append(r.spec.label)
    ours.append(stat.mean if stat else math.nan)
    errs.append(stat.std if stat and stat.std is not None else 0.0)
    published.append(pub if pub is not None else math.nan)
  y = range(len(labels))
  ax.barh([v - 0.2 for v in y], ours, height=0.4, xerr=errs, label='ours', color='tab:blue')
  ax.barh([v + 0.2 for v in y], published, height=0.4, label='published', color='tab:gray',
          hatch='//')
  ax.set_yticks(list(y))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel(metric)
  finite = [v for v in ours + published if not math.isnan(v)]
  if finite:
    lo, hi = min(finite), max(finite)
    ax.set_xlim(max(0.0, lo - 0.15 * (hi - lo + 1e-9) - 0.05 * hi), hi * 1.05 + 1e-9)
  if setting:
    ax.set_title(setting, fontsize=8)
  ax.legend(fontsize=7, loc='lower right')


def _scatter(ax, rows: Sequence[harness.RowResult], x: str, y: str, logx: bool) -> None:
  lines = []
  for r in rows:
    sy = r.stats.get(y)
    if sy is None:
      continue
    sx = r.stats.get(x)
    if sx is None or not math.isfinite(sx.mean):
      lines.append((r, sy))  # No x (e.g. non-private): a horizontal reference line.
      continue
    ax.errorbar([sx.mean], [sy.mean], yerr=[sy.std or 0.0], xerr=[sx.std or 0.0], fmt='o',
                capsize=3, label=r.spec.label)
    pub_x, pub_y = r.spec.published.get(x), r.spec.published.get(y)
    if pub_x is not None and pub_y is not None:
      ax.plot([pub_x], [pub_y], marker='*', markersize=12, linestyle='none', color='k',
              label=f'{r.spec.label} (published)')
  for r, sy in lines:
    style = ':' if r.spec.kind == harness.TRIVIAL else '--'
    ax.axhline(sy.mean, linestyle=style, linewidth=1, color='gray' if style == ':' else 'tab:red')
    ax.annotate(r.spec.label, xy=(0.01, sy.mean), xycoords=('axes fraction', 'data'),
                fontsize=7, va='bottom')
  if logx:
    ax.set_xscale('log')
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  # Beside the axes, so it hides neither points nor the reference lines' labels.
  ax.legend(fontsize=6, loc='center left', bbox_to_anchor=(1.01, 0.5))


def write_outputs(table: harness.TableSpec, run: harness.TableRun, options: harness.RunOptions,
                  command: str, flags: Mapping[str, Any]) -> dict[str, str]:
  """Writes table.csv, table.md, table.png and manifest.json; returns their paths."""
  out = options.output_dir
  beats = harness.beats_trivial(table, run.rows)
  counts: dict[str, int] = {}
  for r in run.results:
    key = 'reused' if r.reused else r.status
    counts[key] = counts.get(key, 0) + 1
  summary = {
      'quick': options.quick,
      'max_rounds': options.max_rounds,
      'max_epochs': options.max_epochs,
      'repeats': sorted({c.repeat for c in run.cells}),
      'machine': version.machine_info(),
      'cell_machines': run.machines(),
      'data': run.data,
      'data_unrecorded': run.data_unrecorded,
      'versions': version.installed_versions(),
      'commit': run.source_commit,
      'command': command,
      'wall_seconds': run.wall_seconds,
      'cell_seconds': sum(r.seconds for r in run.results),
      'counts': ', '.join(f'{v} {k}' for k, v in sorted(counts.items())),
      'problems': run.problems,
      'warnings': run.warnings,
  }
  paths = {name: os.path.join(out, name)
           for name in (CSV_NAME, MARKDOWN_NAME, PLOT_NAME, MANIFEST_NAME)}
  atomic.write(paths[CSV_NAME], to_csv(table, run.rows, beats).encode())
  atomic.write(paths[MARKDOWN_NAME], to_markdown(table, run.rows, beats, summary).encode())
  atomic.write(paths[PLOT_NAME], plot_png(table, run.rows))
  manifest = {
      'table': table.name,
      'title': table.title,
      'command': command,
      'flags': dict(flags),
      'options': {
          'output_dir': options.output_dir, 'seeds': list(options.seeds),
          'quick': options.quick, 'max_rounds': options.max_rounds,
          'max_epochs': options.max_epochs,
          'data_dir': options.data_dir, 'data_paths': dict(options.data_paths),
          'rows': list(options.rows),
      },
      'repeat_label': table.repeat_label,
      'data': summary['data'],
      'data_unrecorded': summary['data_unrecorded'],
      'machine': summary['machine'],
      'versions': summary['versions'],
      'python_packages': _python_packages(),
      'commit': summary['commit'],
      'started_at': run.started_at,
      'finished_at': run.finished_at,
      'wall_seconds': run.wall_seconds,
      'problems': run.problems,
      'warnings': run.warnings,
      'cells': [{
          'name': r.cell.name, 'key': r.cell.key, 'rows': list(r.cell.rows),
          'setting': r.cell.setting, 'repeat': r.cell.repeat, 'status': r.status,
          'reused': r.reused, 'seconds': r.seconds, 'error': r.error,
          'result_file': os.path.relpath(harness.cell_path(out, r.cell), out)
          if r.status == harness.DONE else None,
          'run_dir': os.path.relpath(harness.cell_run_dir(out, r.cell), out),
          'machine': r.machine, 'data': r.data,
          'params': harness._canonical(r.cell.params),  # pylint: disable=protected-access
      } for r in run.results],
  }
  atomic.write_json(paths[MANIFEST_NAME], manifest, inf_as_string=True)
  return paths


def _python_packages() -> dict:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  names = ('numpy', 'tensorflow', 'tensorflow-federated', 'tensorflow-privacy',
           'tensorflow-model-optimization', 'dp-accounting', 'matplotlib', 'absl-py')
  out = {}
  for n in names:
    try:
      out[n] = importlib.metadata.version(n)
    except importlib.metadata.PackageNotFoundError:
      out[n] = None
  return out
