"""Personalized federated recommendation (PFedRec, FedRAP, FedMF, FedRecon) under the federated-NCF protocol.

  python -m experiments.run_personalized --dataset=ml-100k --data_dir=../shared/data \\
      --protocol=as_published --rounds=100 [--algorithm=fedrap|fedmf|fedrecon]

One client per user, every client in every round by default (PFedRec's
train.py). Leave-one-out by time with the val and test items each ranked
against their own 99 negatives, and against all items outside the user's
training set; the reported score is the test score of the round with the
best validation HR@10. `--protocol=leak_free` draws training negatives from
everything outside the user's training set (see tff_rec/data/fedrec_protocol.py).

User-level DP (`--dp=gaussian_fixed|gaussian_adaptive|tree|tree_adaptive|ddp`
with the flags of experiments/dp_flags.py) replaces the server's mean of the
item-table updates with TF Privacy's clipped, noised mean; the accountant's ε
after each round is in history.json (`dp/epsilon`) and the plan in
result.json. The device state (the score function) is never released; see
privacy/federated_dp.py for what the guarantee covers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import app
from absl import flags

from experiments import common_flags
from experiments import dp_flags
from tff_rec import atomic
from tff_rec import runtime
from tff_rec.data import errors
from tff_rec.data import fedrec_protocol
from tff_rec.training import data_setup
from tff_rec.training import device_state
from tff_rec.training import fedrap
from tff_rec.training import personalized
from tff_rec.training import personalized_loop
from tff_rec.training import pfedrec

FLAGS = flags.FLAGS

_PFEDREC = pfedrec.PFedRecConfig()
_FEDRAP = fedrap.FedRAPConfig()
flags.DEFINE_enum('algorithm', 'pfedrec', list(personalized.ALGORITHMS), 'Personalized algorithm.')
flags.DEFINE_enum('dataset', 'ml-100k', [d for d in data_setup.DATASETS if d != 'ncf-ml-1m'],
                  'MovieLens release (every rating is an interaction).')
common_flags.define_data_dir_flag('Folder (or .zip) holding the MovieLens data, e.g. ../shared/data.')
flags.DEFINE_string('cache_dir', None, 'Download cache (default ~/.cache/tff_rec).')
flags.DEFINE_enum('protocol', 'as_published', list(fedrec_protocol.PROTOCOLS),
                  'Pool of the training negatives: as_published (PFedRec\'s code: never the '
                  'held-out items) or leak_free (anything outside the training set).')
flags.DEFINE_integer('rounds', 100, 'Federated rounds (a run directory may be continued to more).')
flags.DEFINE_integer('clients_per_round', None, 'Participants per round (default: every user).')
flags.DEFINE_integer('negatives_per_positive', fedrec_protocol.TRAIN_NEGATIVES,
                     'Fresh training negatives per positive, each round.')
flags.DEFINE_integer('eval_negatives', fedrec_protocol.EVAL_NEGATIVES,
                     'Sampled negatives per held-out item.')
# Every algorithm (default: the algorithm's reference value; fedmf takes pfedrec's).
flags.DEFINE_integer('embedding_dim', None, 'Item embedding size (default 32).')
flags.DEFINE_integer('batch_size', None, f'Client batch size (default: pfedrec {_PFEDREC.batch_size}, '
                     f'fedrap {_FEDRAP.batch_size}).')
flags.DEFINE_integer('local_epochs', None, f'Local epochs per round (default: pfedrec '
                     f'{_PFEDREC.local_epochs}, fedrap at most {_FEDRAP.local_epochs}).')
flags.DEFINE_integer('top_k', 10, 'K of HR@K / NDCG@K.')
# PFedRec, FedMF and FedRecon.
flags.DEFINE_float('learning_rate', None, 'pfedrec, fedmf, fedrecon: SGD rate of the score '
                   f'function / user vector (default {_PFEDREC.learning_rate}).')
flags.DEFINE_float('lr_eta', None, 'pfedrec, fedmf, fedrecon: item rate = learning_rate * '
                   f'num_items * lr_eta (default {_PFEDREC.lr_eta}).')
flags.DEFINE_float('l2', None, 'pfedrec, fedmf, fedrecon: SGD weight decay of head and items '
                   '(default 0).')
flags.DEFINE_integer('recon_epochs', None,
                     'fedrecon: passes of user-vector-only SGD steps that reconstruct the user '
                     'vector from its initial value, before the item steps and before ranking '
                     '(default 5).')
flags.DEFINE_enum('ranking', None, list(pfedrec.RANKINGS),
                  'pfedrec: the item table a device ranks with: fine_tuned (the paper: its own copy '
                  'after the local steps) or global (the aggregated table, with its own head; '
                  'fedmf always does this). See tff_rec/training/pfedrec.py.')
# FedRAP.
flags.DEFINE_float('fedrap_head_lr', None, f'fedrap: head rate (default {_FEDRAP.head_learning_rate}).')
flags.DEFINE_float('fedrap_item_lr', None, f'fedrap: rate of both item tables (default '
                   f'{_FEDRAP.item_learning_rate}).')
flags.DEFINE_float('fedrap_round_decay', None, f'fedrap: rates times this per round (default '
                   f'{_FEDRAP.round_decay}).')
flags.DEFINE_float('fedrap_weight_decay', None, f'fedrap: SGD weight decay (default '
                   f'{_FEDRAP.weight_decay}).')
flags.DEFINE_float('fedrap_lambda', None, f'fedrap: weight of -MSE(P, C) (default {_FEDRAP.lam}).')
flags.DEFINE_float('fedrap_mu', None, f'fedrap: weight of the regularizer on C (default {_FEDRAP.mu}).')
flags.DEFINE_enum('fedrap_regular', None, list(fedrap.REGULARIZERS),
                  f'fedrap: regularizer on C (default {_FEDRAP.regular}).')
flags.DEFINE_enum('fedrap_curriculum', None, list(fedrap.CURRICULA),
                  'fedrap: none (the code: fixed lambda, mu) or tanh (the paper\'s schedule).')
flags.DEFINE_float('fedrap_tol', None, f'fedrap: early-stop tolerance (default {_FEDRAP.tol}).')
common_flags.define_output_flags('personalized')
dp_flags.define_dp_flags()
flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.')


_OWN_FLAGS = {
    'pfedrec': {'learning_rate': 'learning_rate', 'lr_eta': 'lr_eta', 'l2': 'l2',
                'ranking': 'ranking'},
    'fedmf': {'learning_rate': 'learning_rate', 'lr_eta': 'lr_eta', 'l2': 'l2'},
    'fedrecon': {'learning_rate': 'learning_rate', 'lr_eta': 'lr_eta', 'l2': 'l2',
                 'recon_epochs': 'recon_epochs'},
    'fedrap': {'fedrap_head_lr': 'head_learning_rate', 'fedrap_item_lr': 'item_learning_rate',
               'fedrap_round_decay': 'round_decay', 'fedrap_weight_decay': 'weight_decay',
               'fedrap_lambda': 'lam', 'fedrap_mu': 'mu', 'fedrap_regular': 'regular',
               'fedrap_curriculum': 'curriculum', 'fedrap_tol': 'tol'},
}
_SHARED = ('embedding_dim', 'batch_size', 'local_epochs', 'top_k')


def _configs():
  """(hparams, loop config), validated before any work; UsageError names the flag."""
  for name in ('rounds', 'negatives_per_positive', 'top_k', 'eval_negatives'):
    common_flags._positive(name)  # pylint: disable=protected-access
  for name in ('clients_per_round', 'recon_epochs', 'embedding_dim', 'batch_size', 'local_epochs',
               'learning_rate', 'lr_eta', 'fedrap_head_lr', 'fedrap_item_lr', 'fedrap_round_decay'):
    common_flags._positive(name, allow_none=True)  # pylint: disable=protected-access
  for name in ('l2', 'fedrap_weight_decay', 'fedrap_lambda', 'fedrap_mu', 'fedrap_tol'):
    if FLAGS[name].value is not None and FLAGS[name].value < 0:
      raise app.UsageError(f'--{name} must be >= 0, got {FLAGS[name].value}')
  if FLAGS.data_dir is not None and not os.path.exists(FLAGS.data_dir):
    raise app.UsageError(f'--data_dir={FLAGS.data_dir} does not exist')
  algorithm = FLAGS.algorithm
  for other, names in _OWN_FLAGS.items():
    if other != algorithm:
      given = [n for n in names if FLAGS[n].present and n not in _OWN_FLAGS[algorithm]]
      if given:
        raise app.UsageError(f'--{given[0]} is a flag of --algorithm={other}, not {algorithm}')
  values = {field: FLAGS[flag].value for flag, field in _OWN_FLAGS[algorithm].items()}
  values.update({name: FLAGS[name].value for name in _SHARED})
  values = {k: v for k, v in values.items() if v is not None}
  try:
    hparams = personalized.HPARAMS[algorithm](**values)
  except ValueError as e:
    raise app.UsageError(f'--algorithm={algorithm} flags: {e}') from e
  loop = personalized_loop.LoopConfig(
      rounds=FLAGS.rounds, protocol=FLAGS.protocol, clients_per_round=FLAGS.clients_per_round,
      negatives_per_positive=FLAGS.negatives_per_positive, seed=FLAGS.seed)
  return hparams, loop


def main(argv: Sequence[str]) -> None:
  del argv
  common_flags.quiet_logging()
  hparams, loop = _configs()
  dp_config = dp_flags.dp_config_from_flags()
  if FLAGS.secure_aggregation != 'none':
    raise app.UsageError(
        f'--secure_aggregation={FLAGS.secure_aggregation} is not available in run_personalized '
        '(its secure rounds drive experiments.run_federated\'s loop); --dp=ddp here uses TFF\'s '
        'simulated secure sum')
  run_dir = os.path.join(FLAGS.root_output_dir, FLAGS.experiment_name)
  try:
    ratings = data_setup.load_ratings(data_setup.DataConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, cache_dir=FLAGS.cache_dir,
        seed=FLAGS.seed))
    data = fedrec_protocol.fedrec_split(ratings, seed=FLAGS.seed,
                                        num_eval_negatives=FLAGS.eval_negatives)
  except (errors.DataError, ValueError) as e:
    raise app.UsageError(f'--dataset/--data_dir: {e}') from e
  dp = dp_flags.prepare_personalized_dp_for_run(
      dp_config, clients_per_round=loop.clients_per_round, population=data.num_users,
      rounds=loop.rounds)
  if dp.total_rounds < loop.rounds:
    loop = dataclasses.replace(loop, rounds=dp.total_rounds)
  if dp.needs_secure_context:
    runtime.set_local_context(secure_intrinsics=True)
  else:
    runtime.ensure_context()
  result = personalized.train(
      FLAGS.algorithm, data, hparams=hparams, loop=loop, run_dir=run_dir,
      model_aggregator=dp.aggregator,
      aggregator_description=dp.report() if dp.enabled else 'uniform mean',
      progress=FLAGS.progress_bar, round_metrics=dp.extra_metrics_fn)
  best = result.best
  summary = dict(algorithm=FLAGS.algorithm, dataset=FLAGS.dataset, protocol=FLAGS.protocol,
                 seed=FLAGS.seed, rounds=loop.rounds, best_round=result.best_round,
                 seconds_per_round=result.seconds_per_round,
                 **{k: best[k] for k in best if k.startswith(('val_', 'test_'))})
  if dp.enabled:
    # Every round's model is released, so the run's epsilon is that of its last round.
    summary['dp'] = dict(dp.report(), epsilon=dp.epsilon_after(loop.rounds))
  atomic.write_json(os.path.join(run_dir, 'result.json'), summary)
  if dp.enabled:
    print(f'user-level DP: epsilon {summary["dp"]["epsilon"]:.4g} at delta {dp.delta:.3g} '
          f'after {loop.rounds} rounds ({dp_config.accountant} accountant)')
  print(f'{run_dir}: best round {result.best_round} by val HR@{hparams.top_k}: '
        f'test HR {best["test_hr"]:.4f} NDCG {best["test_ndcg"]:.4f} (sampled), '
        f'HR {best["test_full_hr"]:.4f} NDCG {best["test_full_ndcg"]:.4f} (full ranking); '
        f'{result.seconds_per_round:.2f} s/round')


if __name__ == '__main__':
  common_flags.clean_errors(device_state.DeviceStateError, FloatingPointError)
  common_flags.run(main)
