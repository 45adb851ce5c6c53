"""Verified checkpoints: TFF's `FileProgramStateManager` plus a manifest per checkpoint.

TFF writes each `program_state_<round>` SavedModel to a temporary directory
and renames it, but never checks it on load: a truncated or bit-flipped
variables file (a full disk, a bad disk, a copy cut short) makes every later
resume fail. Here every checkpoint gets `MANIFEST.json` (each file's size and
sha256), written last, after the files are flushed to disk, and atomically.
A checkpoint is intact only if its manifest is there and every file matches
it; `set_aside_damaged` moves any other one to `checkpoints/incomplete/` (with
the reason in the log), so that TFF resumes from the newest intact
checkpoint, and a partial checkpoint is never taken for a complete one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Optional

from absl import logging
import tensorflow_federated as tff

from tff_rec import atomic

MANIFEST = 'MANIFEST.json'
PREFIX = 'program_state_'
_FORMAT = 'tff-rec-checkpoint-manifest/1'


def _files(path: str) -> list[str]:
  out = []
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_manifest(path: str) -> str:
  """Flushes the checkpoint at `path` to disk, then writes its manifest atomically."""
  entries = {}
  for rel in _files(path):
    full = os.path.join(path, rel)
    _fsync(full)
    entries[rel] = {'bytes': os.path.getsize(full), 'sha256': _sha256(full)}
  for root, _, _ in os.walk(path):
    _fsync(root)
  manifest = os.path.join(path, MANIFEST)
  atomic.write(manifest, json.dumps({'format': _FORMAT, 'files': entries}, indent=1, sort_keys=True,
                                    allow_nan=False) + '\n')
  _fsync(path)
  return manifest


def damage(path: str) -> Optional[str]:
  """Why the checkpoint at `path` is not intact, or None if it is."""
  manifest = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest):
    return f'no {MANIFEST} (the save did not finish, or it predates manifests)'
  try:
    with open(manifest) as f:
      record = json.load(f)
    files = record['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'unreadable {MANIFEST}: {e}'
  if record.get('format') != _FORMAT:
    return f'{MANIFEST} has an unknown format {record.get("format")!r}'
  present = set(_files(path))
  for rel, entry in sorted(files.items()):
    full = os.path.join(path, rel)
    if rel not in present:
      return f'{rel} is missing'
    size = os.path.getsize(full)
    if size != entry['bytes']:
      return f'{rel} has {size} bytes, the manifest says {entry["bytes"]}'
    if _sha256(full) != entry['sha256']:
      return f'{rel} does not match its sha256 in the manifest'
  extra = present - set(files)
  if extra:
    return f'files not in the manifest: {", ".join(sorted(extra))}'
  return None


def checkpoint_rounds(checkpoint_dir: str) -> dict[int, str]:
  """Round -> path of every `program_state_<round>` directory (intact or not)."""
  rounds = {}
  for path in glob.glob(os.path.join(checkpoint_dir, PREFIX + '*')):
    suffix = os.path.basename(path)[len(PREFIX):]
    if suffix.isdigit() and os.path.isdir(path):
      rounds[int(suffix)] = path
  return rounds


def intact_rounds(checkpoint_dir: str) -> list[int]:
  """Rounds of the checkpoints that verify against their manifest, ascending."""
  return sorted(r for r, path in checkpoint_rounds(checkpoint_dir).items() if damage(path) is None)


def set_aside_damaged(checkpoint_dir: str) -> list[str]:
  """Moves every checkpoint that does not verify to `incomplete/`; their new paths.

  Logs, for each, the reason and the round training will resume from.
  """
  moved = []
  rounds = checkpoint_rounds(checkpoint_dir)
  for round_num, path in sorted(rounds.items()):
    reason = damage(path)
    if reason is None:
      continue
    target = os.path.join(checkpoint_dir, 'incomplete',
                          f'{os.path.basename(path)}-{time.strftime("%Y%m%dT%H%M%S")}')
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(path, target)
    moved.append(target)
    intact = [r for r in intact_rounds(checkpoint_dir) if r < round_num]
    fallback = f'round {intact[-1]}' if intact else 'the start (no intact checkpoint before it)'
    logging.warning('Checkpoint of round %d is damaged (%s); moved it to %s. Training resumes '
                    'from %s.', round_num, reason, target, fallback)
  return moved


class VerifiedProgramStateManager(tff.program.FileProgramStateManager):
  """`tff.program.FileProgramStateManager` that writes a manifest after each save."""

  async def save(self, program_state, version: int) -> None:
    await super().save(program_state, version)
    path = self._get_path_for_version(version)
    if os.path.isdir(path):  # (It may be removed already when keep_total is 0.)
      write_manifest(path)
