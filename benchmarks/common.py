"""What every benchmark records: machine, versions, parameters, results.

Each benchmark writes `<out_dir>/<name>.json` (atomically) and a short
`<name>.md`. Timings on a shared machine are noisy: compare numbers measured
in the same process (ratios), not across runs.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import psutil

from tff_rec import atomic
from tff_rec import version
from tff_rec.training import artifacts

SCHEMA = 'tff-rec-benchmark/1'


def machine_info() -> dict:
  """Cores, memory, CPU model, OS and the load when the benchmark started."""
  try:
    load = list(os.getloadavg())
  except OSError:
    load = None
  return {
      'hostname': platform.node(),
      'cpu_model': version.cpu_model(),
      'logical_cores': psutil.cpu_count(logical=True),
      'physical_cores': psutil.cpu_count(logical=False),
      'usable_cores': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'ram_total_gib': round(psutil.virtual_memory().total / 2**30, 2),
      'ram_available_gib': round(psutil.virtual_memory().available / 2**30, 2),
      'load_average_1_5_15': load,
      'platform': platform.platform(),
      'python': sys.version.split()[0],
  }


def versions() -> dict:
  """Versions of the stack (TF, TFF, ...), numpy and psutil, and tff-rec."""
  found = dict(version.installed_versions())
  found['numpy'] = np.__version__
  found['psutil'] = psutil.__version__
  found['tff_rec'] = version.__version__
  return found


def _status_kib(pid: int, field: str) -> Optional[int]:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except (OSError, ValueError):
    pass
  return None


def reset_peak_rss(pid: int) -> bool:
  """Resets the kernel's peak-RSS counter (VmHWM) of `pid`; False if unsupported."""
  try:
    with open(f'/proc/{pid}/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_gib(pid: int) -> Optional[float]:
  """Peak resident memory of `pid` since start or the last reset (VmHWM), GiB."""
  kib = _status_kib(pid, 'VmHWM')
  if kib is None:
    try:
      return psutil.Process(pid).memory_info().rss / 2**30
    except psutil.Error:
      return None
  return kib / 2**20


class PeakMemory:
  """Peak RSS of this process and of given children (e.g. TFF's worker_binary)."""

  def __init__(self, child_pids: Iterable[int] = ()):
    self.pids = {'python': os.getpid()}
    for i, pid in enumerate(child_pids):
      self.pids[f'worker{i}' if i else 'worker'] = pid

  def __enter__(self) -> 'PeakMemory':
    for pid in self.pids.values():
      reset_peak_rss(pid)
    return self

  def __exit__(self, *exc) -> None:
    self.result = {f'peak_rss_{k}_gib': _round(peak_rss_gib(p)) for k, p in self.pids.items()}
    values = [v for v in self.result.values() if v is not None]
    self.result['peak_rss_total_gib'] = _round(sum(values)) if values else None


def _round(x: Optional[float], digits: int = 3) -> Optional[float]:
  return None if x is None else round(float(x), digits)


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
  """(seconds, result) of one call."""
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return time.perf_counter() - start, result


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
  """Least squares y = a + b * x: {'a', 'b', 'r2'}."""
  x = np.asarray(x, float)
  y = np.asarray(y, float)
  if len(x) < 2:
    return {'a': None, 'b': None, 'r2': None}
  b, a = np.polyfit(x, y, 1)
  residual = y - (a + b * x)
  total = np.sum((y - y.mean()) ** 2)
  r2 = 1.0 - float(np.sum(residual ** 2) / total) if total > 0 else 1.0
  return {'a': float(a), 'b': float(b), 'r2': r2}


def write_result(out_dir: str, name: str, parameters: Mapping[str, Any], results: Any,
                 summary_markdown: str, started: float) -> str:
  """Writes `<name>.json` and `<name>.md` in `out_dir`; returns the JSON path."""
  os.makedirs(out_dir, exist_ok=True)
  payload = {
      'schema': SCHEMA,
      'benchmark': name,
      'started_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started)),
      'wall_seconds': round(time.time() - started, 1),
      'command': ' '.join(sys.argv),
      'machine': machine_info(),
      'versions': versions(),
      'parameters': dict(parameters),
      'results': results,
  }
  path = os.path.join(out_dir, f'{name}.json')
  artifacts.write_json(path, payload)
  write_text(os.path.join(out_dir, f'{name}.md'), summary_markdown)
  return path


def write_text(path: str, text: str) -> None:
  """Writes text to `path` atomically."""
  atomic.write(path, text if text.endswith('\n') else text + '\n')


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A Markdown table of `rows` (missing cells blank, floats to 4 significant digits)."""
  def cell(v):
    if v is None:
      return ''
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join(cell(row.get(c)) for c in columns) + ' |')
  return '\n'.join(lines)


def machine_line() -> str:
  """One Markdown line describing the machine."""
  m = machine_info()
  return (f'Machine: {m["cpu_model"]}, {m["usable_cores"]} usable cores, {m["ram_total_gib"]} GiB RAM, '
          f'load {m["load_average_1_5_15"]}. Versions: ' +
          ', '.join(f'{k} {v}' for k, v in versions().items()))
