"""The training loop's checkpoint handling on disk."""

import os

from tff_rec.training import loop


def _checkpoint(root, round_num, complete=True):
  path = os.path.join(root, 'checkpoints', f'program_state_{round_num}')
  os.makedirs(os.path.join(path, 'variables'))
  os.makedirs(os.path.join(path, 'assets'))
  if complete:
    for name in ('saved_model.pb', os.path.join('variables', 'variables.index')):
      with open(os.path.join(path, name), 'wb') as f:
        f.write(b'x')
  return path


def test_latest_checkpoint_round_skips_damaged_checkpoints(tmp_path):
  root = str(tmp_path)
  assert loop.latest_checkpoint_round(root) is None
  _checkpoint(root, 0)
  _checkpoint(root, 5)
  damaged = _checkpoint(root, 10, complete=False)
  assert loop.latest_checkpoint_round(root) == 5
  os.remove(os.path.join(_checkpoint(root, 15), 'variables', 'variables.index'))
  assert loop.latest_checkpoint_round(root) == 5
  assert os.path.isdir(damaged)  # only looked at, not moved


def test_damaged_checkpoints_are_moved_out_of_tffs_sight(tmp_path):
  root = str(tmp_path)
  checkpoint_dir = os.path.join(root, 'checkpoints')
  _checkpoint(root, 0)
  _checkpoint(root, 5)
  _checkpoint(root, 10, complete=False)
  moved = loop.set_aside_incomplete_checkpoints(checkpoint_dir)
  assert len(moved) == 1
  assert os.path.basename(moved[0]).startswith('program_state_10-')
  assert os.path.dirname(moved[0]) == os.path.join(checkpoint_dir, 'incomplete')
  # What TFF's FileProgramStateManager would list: names starting with the prefix.
  assert sorted(e for e in os.listdir(checkpoint_dir) if e.startswith('program_state_')) == [
      'program_state_0', 'program_state_5']
  assert loop.set_aside_incomplete_checkpoints(checkpoint_dir) == []
  assert loop.latest_checkpoint_round(root) == 5
