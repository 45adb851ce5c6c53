"""Table 5: model size and communication under compression on ML-1M.

Rows and cells of `python -m experiments.reproduce --table=compression_ml1m`
(README, section 5).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from experiments.tables import common
from experiments.tables import fedrecon_ml1m
from experiments.tables import harness
from experiments.tables import shared
from tff_rec.data import splits as splits_lib
from tff_rec.models import predictions
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import experiment
from tff_rec.training import local_recon

CP_SIZE = 'Model size (central biased MF, ML-1M random 90/10)'
CP_COMM = 'Communication (FedRecon, ML-1M by user, google-research model)'
CP_TRIVIAL = 'Global mean (trivial)'
CP_FLOAT = 'float32 (no compression)'
CP_F16 = 'float16 storage'
CP_INT8 = 'int8 storage (per-row scales)'
CP_PRUNE = 'pruned {:.0%} (SVD basis) + 1 epoch fine-tuning'
CP_PRUNE_TRAINED = 'pruned 80% (trained basis) + 1 epoch fine-tuning'
CP_PRUNE_INT8 = 'pruned 80% (SVD basis) + int8'
CP_SPARSITIES = (0.5, 0.8, 0.9)
# variant -> (compression mode, TFF's adaptive zeroing and clipping, row label). The
# first three differ only in quantization; the last is `tff.learning.compression_aggregator`.
CP_COMM_VARIANTS = {
    'none': ('none', False, 'FedRecon, float32 updates'),
    'quantize8': ('quantize8', False, 'FedRecon, 8-bit quantized updates'),
    'hadamard8': ('hadamard8', False, 'FedRecon, 8-bit updates + Hadamard rotation'),
    'quantize8_clip': ('quantize8', True, 'FedRecon, 8-bit + adaptive zeroing and clipping '
                       '(tff.learning.compression_aggregator)'),
}
CP_COMM_ROWS = {variant: label for variant, (_, _, label) in CP_COMM_VARIANTS.items()}


def _size_rows() -> list[str]:
  return ([CP_FLOAT, CP_F16, CP_INT8] + [CP_PRUNE.format(p) for p in CP_SPARSITIES]
          + [CP_PRUNE_TRAINED, CP_PRUNE_INT8])


@dataclasses.dataclass(frozen=True)
class _CpSetting:
  max_users: Optional[int]
  central_epochs: int
  finetune_epochs: int
  fed_max_users: Optional[int]
  clients_per_round: int
  rounds: int
  val_fraction: float = 0.1


def _cp_setting(quick: bool) -> _CpSetting:
  if quick:
    return _CpSetting(600, 2, 0, 300, 20, 2, 0.0)
  return _CpSetting(None, 15, 1, None, 100, 100)


def compression_modules():
  """(pruning, quantization, comm, report) or CellSkipped if not installed."""
  try:
    from compression import comm  # pylint: disable=g-import-not-at-top
    from compression import pruning  # pylint: disable=g-import-not-at-top
    from compression import quantization  # pylint: disable=g-import-not-at-top
    from compression import report  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise harness.CellSkipped(f'skipped: compression module not available ({e})') from e
  return pruning, quantization, comm, report


def compression_table() -> harness.TableSpec:
  size_cols = [shared.Column('size_bytes', 'weights (bytes)', 0, lower_is_better=True),
               shared.Column('gzip_bytes', 'gzip (bytes)', 0, lower_is_better=True)]
  comm_cols = [shared.Column('upload_bytes', 'upload / client / round (bytes)', 0, lower_is_better=True),
               shared.Column('upload_compression', 'upload ratio', 2)]
  rows = [shared.RowSpec(CP_TRIVIAL, CP_SIZE, shared.TRIVIAL)]
  rows += [shared.RowSpec(label, CP_SIZE) for label in _size_rows()]
  rows += [shared.RowSpec(CP_TRIVIAL, CP_COMM, shared.TRIVIAL)]
  rows += [shared.RowSpec(label, CP_COMM, beats_trivial_quick=False) for label in CP_COMM_ROWS.values()]

  def build(options: harness.RunOptions) -> list[shared.Cell]:
    s = _cp_setting(options.quick)
    rounds = common.capped_rounds(options, s.rounds)
    cells = []
    for seed in options.seeds:
      base = dict(seed=seed, **dataclasses.asdict(s))
      cells.append(shared.Cell(f'size-s{seed}', (CP_TRIVIAL,) + tuple(_size_rows()), CP_SIZE, seed,
                        dict(base, model=_cp_model_config(s, seed),
                             rating_metrics=predictions.RULE),
                        functools.partial(_cp_size, s, seed)))
      cells.append(shared.Cell(f'comm-trivial-s{seed}', (CP_TRIVIAL,), CP_COMM, seed, base,
                        functools.partial(_cp_comm_trivial, s, seed)))
      for variant, (mode, clip, label) in CP_COMM_VARIANTS.items():
        cfg = _cp_fed_config(s, seed, rounds)
        params = shared.federated_params(base, cfg, mode=mode, zeroing_and_clipping=clip)
        cells.append(shared.Cell(f'comm-{variant}-s{seed}', (label,), CP_COMM, seed, params,
                          functools.partial(_cp_comm, s, cfg, mode, clip, label)))
    return cells

  return harness.TableSpec(
      name='compression_ml1m',
      title='Compression on MovieLens-1M: model size and communication against accuracy',
      description=(
          'Size: biased MF (dim 32, L2 0.1, Adam 0.003, batch 1024, 15 epochs) trained '
          'centrally on a random 90/10 split of ML-1M, then compressed with `compression/`: '
          'float16 or int8 storage (`quantization.quantize_storage`: per-row int8 scales for '
          'embedding tables), magnitude pruning of the embedding tables with TF-MOT '
          '(`pruning.prune`, constant schedule, 1 epoch of Adam 0.001 fine-tuning; bias '
          'tables kept dense) in the balanced SVD basis of the two tables '
          '(`compression.rotation`: scores unchanged, weak directions pruned first) and, for '
          'comparison, in the basis training ended in; and pruning followed by int8. Size = bytes of the saved '
          'weights (TF checkpoint) and the sum of gzip -9 of its files (pruned zeros only '
          'shrink the gzip size). Communication: FedRecon (google-research model and data: MF '
          'dim 50, batch 5, <= 300 ratings per user, SGD 0.5 / 1.0 / 0.1, 5 reconstruction '
          'epochs, <= 50 + 50 steps), 100 clients per round, 100 rounds, example-weighted mean '
          'of the item update: float32; 8-bit quantization of the update (tensors above '
          '20,000 elements quantized between their min and max, stochastic rounding, as in '
          'TFF\'s `compression_aggregator`); the same after a randomized Hadamard rotation; '
          'and TFF\'s `compression_aggregator` as it is (8-bit plus adaptive zeroing and '
          'L2 clipping) (`compression/comm.py`). Bytes per client and round are counted from the TFF types '
          'of the aggregation (`comm.aggregator_comm_stats`).'),
      columns=[shared.RMSE, shared.MAE, shared.ACC] + size_cols + comm_cols + [shared.ROUNDS],
      rows=rows,
      build_cells=build,
      check_metric='rmse',
      notes=[
          'No published numbers: this table measures our compression modules, it does not '
          'reproduce a paper.',
          'The float32, 8-bit and Hadamard rows differ only in quantization (all plain '
          'weighted means); the last row adds TFF\'s adaptive zeroing and clipping, whose '
          'effect on accuracy is then visible separately from that of quantization.',
      ],
      plot=dict(kind='scatter_panels', panels=[
          dict(setting=CP_SIZE, x='gzip_bytes', y='rmse', logx=True),
          dict(setting=CP_COMM, x='upload_bytes', y='rmse', logx=True)]),
  )


def _cp_model_config(s: _CpSetting, seed: int) -> dict:
  return dict(model='mf', embedding_dim=32, l2=0.1, init_stddev=0.1, optimizer='adam',
              learning_rate=0.003, batch_size=1024, epochs=s.central_epochs,
              finetune_epochs=s.finetune_epochs, sparsities=list(CP_SPARSITIES),
              prune_schedule='constant', prune_basis='svd', seed=seed)


def _weights_size(model, report) -> tuple[int, int]:
  """(bytes, gzip bytes) of the model's weight arrays as stored (one .npy each)."""
  tmp = tempfile.mkdtemp(prefix='tff_rec_size_')
  try:
    for k, w in enumerate(model.get_weights()):
      np.save(os.path.join(tmp, f'{k}.npy'), w)
    return report.disk_bytes(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _cp_size(s: _CpSetting, seed: int, ctx: harness.CellContext) -> dict:
  pruning, quantization, _, report = compression_modules()
  ratings, _ = common.movielens(ctx, common.ML1M)
  if s.max_users:
    ratings = data_setup.first_users(ratings, s.max_users)
  split = splits_lib.split_random(ratings, fractions=(0.9, 0.0, 0.1), seed=seed)
  cfg = central.CentralConfig(
      model=experiment.ModelConfig('mf', dict(embedding_dim=32, l2=0.1, init_stddev=0.1)),
      optimizer=shared.ADAM(0.003), epochs=s.central_epochs, batch_size=1024, seed=seed)
  trained = common.run_central(ctx, cfg, split)
  test = split.test

  def measure(model, stored=None) -> dict:
    stored = stored or model
    # Unclipped, as every rating metric (tff_rec/models/predictions.py).
    m = common.pick(predictions.rating_metrics(
        predictions.predict(stored, test.users, test.items), test.ratings))
    raw, gz = _weights_size(stored, report)
    params, nonzero = report.param_counts(model)
    m.update(size_bytes=raw, gzip_bytes=gz, params=params, nonzero_params=nonzero)
    return m

  out = {CP_TRIVIAL: common.pick(common.global_mean_metrics(split.train, test))}
  base = trained.model
  out[CP_FLOAT] = measure(base)
  for mode, label in (('float16', CP_F16), ('int8', CP_INT8)):
    stored, _ = quantization.quantize_storage(base, mode)
    out[label] = measure(base, stored)
  pruned_80 = None
  config = lambda p, basis: pruning.PruningConfig(
      target_sparsity=p, schedule='constant', finetune_epochs=s.finetune_epochs,
      batch_size=1024, learning_rate=1e-3, seed=seed, basis=basis)
  for p in CP_SPARSITIES:
    result = pruning.prune(base, 'rating', split.train, config(p, 'svd'))
    out[CP_PRUNE.format(p)] = measure(result.model)
    if p == 0.8:
      pruned_80 = result.model
  out[CP_PRUNE_TRAINED] = measure(
      pruning.prune(base, 'rating', split.train, config(0.8, 'none')).model)
  stored, _ = quantization.quantize_storage(pruned_80, 'int8')
  out[CP_PRUNE_INT8] = measure(pruned_80, stored)
  return out


def _cp_fed_config(s: _CpSetting, seed: int, rounds: int) -> experiment.FederatedConfig:
  base = fedrecon_ml1m.fr_config(fedrecon_ml1m.fr_settings(False)[1], 'fedrecon', seed, rounds)
  return dataclasses.replace(
      base, data=dataclasses.replace(base.data, max_users=s.fed_max_users,
                                     val_fraction=s.val_fraction),
      clients_per_round=s.clients_per_round, finetune_eval=False,
      **shared.final_eval_only(rounds, s.val_fraction))


def _cp_comm_trivial(s: _CpSetting, seed: int, ctx: harness.CellContext) -> dict:
  split = shared.by_user_split(ctx, s.fed_max_users, seed, s.val_fraction)
  train = common.capped_test(dataclasses.replace(split, test=split.train), 300)
  _, query = local_recon.support_query_split(common.capped_test(split, 300), 5, 50)
  return {CP_TRIVIAL: common.pick(common.global_mean_metrics(train, query))}


def _cp_comm(s: _CpSetting, cfg: experiment.FederatedConfig, mode: str, clip: bool, label: str,
             ctx: harness.CellContext) -> dict:
  split = shared.by_user_split(ctx, s.fed_max_users, cfg.seed, s.val_fraction)
  result, prepared = common.run_federated(
      ctx, cfg, split,
      checkpoint_every=fedrecon_ml1m.fr_checkpoint_every(fedrecon_ml1m.fr_settings(False)[1]),
      compression=mode, compression_zeroing=clip, compression_clipping=clip)
  cfg, stats = prepared.config, prepared.comm
  out = common.pick(result.test_metrics)
  out.update(upload_bytes=stats.upload_bytes, download_bytes=stats.download_bytes,
             upload_compression=stats.upload_compression, rounds=cfg.total_rounds,
             total_upload_bytes=stats.upload_bytes * cfg.clients_per_round * cfg.total_rounds)
  return {label: out}
