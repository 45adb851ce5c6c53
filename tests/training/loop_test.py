"""Checkpoints on disk: manifests, verification, and setting damaged ones aside."""

import sys
import asyncio
import os

import numpy as np
import pytest

from tff_rec.training import checkpoints
from tff_rec.training import loop


def _checkpoint(root, round_num, manifest=True):
  path = os.path.join(root, 'checkpoints', f'program_state_{round_num}')
  os.makedirs(os.path.join(path, 'variables'))
  os.makedirs(os.path.join(path, 'assets'))
  for name, data in (('saved_model.pb', b'graph' * 10),
                     (os.path.join('variables', 'variables.index'), b'index'),
                     (os.path.join('variables', 'variables.data-00000-of-00001'), bytes(range(256)))):
    with open(os.path.join(path, name), 'wb') as f:
      f.write(data)
  if manifest:
    checkpoints.write_manifest(path)
  return path


def _data_file(path):
  return os.path.join(path, 'variables', 'variables.data-00000-of-00001')


def test_latest_checkpoint_round_takes_only_verified_checkpoints(tmp_path):
  root = str(tmp_path)
  assert loop.latest_checkpoint_round(root) is None
  _checkpoint(root, 0)
  _checkpoint(root, 5)
  partial = _checkpoint(root, 10, manifest=False)
  assert loop.latest_checkpoint_round(root) == 5
  truncated = _checkpoint(root, 15)
  with open(_data_file(truncated), 'r+b') as f:
    f.truncate(100)
  assert loop.latest_checkpoint_round(root) == 5
  assert os.path.isdir(partial)  # only looked at, not moved


@pytest.mark.parametrize('harm,reason', [
    ('truncate', 'bytes, the manifest says'),
    ('flip', 'does not match its sha256'),
    ('delete', 'is missing'),
    ('manifest', 'no MANIFEST.json'),
    ('extra', 'not in the manifest'),
])
def test_damage_names_what_is_wrong(tmp_path, harm, reason):
  path = _checkpoint(str(tmp_path), 3)
  assert checkpoints.damage(path) is None
  data = _data_file(path)
  if harm == 'truncate':
    with open(data, 'r+b') as f:
      f.truncate(10)
  elif harm == 'flip':
    with open(data, 'r+b') as f:
      f.seek(17)
      byte = f.read(1)
      f.seek(17)
      f.write(bytes([byte[0] ^ 0x01]))
  elif harm == 'delete':
    os.remove(data)
  elif harm == 'manifest':
    os.remove(os.path.join(path, checkpoints.MANIFEST))
  else:
    with open(os.path.join(path, 'stray'), 'w') as f:
      f.write('x')
  assert reason in checkpoints.damage(path)


def test_damaged_checkpoints_are_moved_out_of_tffs_sight(tmp_path, caplog):
  root = str(tmp_path)
  checkpoint_dir = os.path.join(root, 'checkpoints')
  _checkpoint(root, 0)
  _checkpoint(root, 5)
  flipped = _checkpoint(root, 10)
  with open(_data_file(flipped), 'r+b') as f:
    f.write(b'\x00\x00')
  moved = checkpoints.set_aside_damaged(checkpoint_dir)
  assert len(moved) == 1
  assert os.path.basename(moved[0]).startswith('program_state_10-')
  assert os.path.dirname(moved[0]) == os.path.join(checkpoint_dir, 'incomplete')
  assert 'resumes from round 5' in caplog.text
  # What TFF's FileProgramStateManager would list: names starting with the prefix.
  assert sorted(e for e in os.listdir(checkpoint_dir) if e.startswith('program_state_')) == [
      'program_state_0', 'program_state_5']
  assert checkpoints.set_aside_damaged(checkpoint_dir) == []
  assert loop.latest_checkpoint_round(root) == 5


def test_the_state_manager_writes_a_manifest_that_verifies(tmp_path):
  manager = checkpoints.VerifiedProgramStateManager(root_dir=str(tmp_path), prefix=checkpoints.PREFIX)
  state = {'w': np.arange(6, dtype=np.float32), 'round': np.int32(2)}
  # A private event loop (asyncio.run would unset the thread's, which TFF uses later).
  event_loop = asyncio.new_event_loop()
  try:
    event_loop.run_until_complete(manager.save(state, 2))
    path = os.path.join(str(tmp_path), 'program_state_2')
    assert checkpoints.damage(path) is None
    loaded, version = event_loop.run_until_complete(manager.load_latest(state))
  finally:
    event_loop.close()
  assert version == 2 and np.array_equal(loaded['w'], state['w'])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
