"""Sequential recommendation (SASRec), central or federated, with the SASRec evaluation protocol.

  python -m experiments.run_sequential --dataset=ml-1m --data_dir=../shared/data \\
      [--size=paper|large] [--epochs=200]
  python -m experiments.run_sequential --training=fedavg --rounds=300 \\
      --clients_per_round=256 [--dp=gaussian_fixed --target_epsilon=8 --dp_clip=0.1]

Each user's ratings in time order; the last is the test item, the second to
last the validation item (tff_rec/data/sequences.py). Each held-out item is
ranked against 100 negatives the user never rated, and against every item
outside the user's history; the reported score is the test score at the
evaluation with the best validation HR@10. `--size=paper` is Kang and
McAuley's ML-1M setting (d=50, 2 blocks, 1 head, maxlen 200, dropout 0.2,
Adam 0.001, batch 128); `--size=large` is d=256, 4 blocks, 4 heads.
`--item_text=init|input` brings in all-MiniLM-L6-v2 embeddings of the items'
catalog texts (tff_rec/training/item_text_features.py).

`--training=fedavg` trains with one client per user: a user's sequence never
leaves the device; each round samples --clients_per_round users uniformly
without replacement, each takes --local_steps SGD steps on its own window,
and the server applies the mean weight delta with its optimizer
(tff_rec/training/sequential_fedavg.py). `--dp=...` (flags of
experiments/dp_flags.py) replaces that mean with TF Privacy's clipped,
noised mean over users; the accountant's ε is in history.json and result.json.

Writes hparams.json, history.json (one row per evaluation) and result.json
under --root_output_dir/--experiment_name.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import app
from absl import flags

from experiments import common_flags
from experiments import dp_flags
from tff_rec import runtime
from tff_rec import atomic
from tff_rec.data import errors
from tff_rec.data import sequences
from tff_rec.export import sequential_serving
from tff_rec.export import serving
from tff_rec.models import sasrec
from tff_rec.models import text_encoder
from tff_rec.training import data_setup
from tff_rec.training import item_text_features
from tff_rec.training import run_dir as run_dir_lib
from tff_rec.training import sequential
from tff_rec.training import sequential_fedavg

FLAGS = flags.FLAGS

SIZES = {
    'paper': dict(hidden_units=50, num_blocks=2, num_heads=1),
    'large': dict(hidden_units=256, num_blocks=4, num_heads=4),
}
_DATASETS = ('ml-1m', 'ml-100k', 'ml-latest-small')

flags.DEFINE_enum('dataset', 'ml-1m', list(_DATASETS), 'MovieLens release (every rating is an action).')
common_flags.define_data_dir_flag('Folder (or .zip) holding the MovieLens data, e.g. ../shared/data.')
flags.DEFINE_string('cache_dir', None, 'Download cache (default ~/.cache/tff_rec).')
flags.DEFINE_integer('min_actions', sequences.MIN_ACTIONS,
                     'Drop users and items with fewer actions (0 keeps all).')
flags.DEFINE_integer('eval_negatives', sequences.EVAL_NEGATIVES, 'Sampled negatives per held-out item.')
flags.DEFINE_float('cold_items', 0.0, 'Hold this share of the items out of training entirely '
                   '(cold start); result.json then reports the test users whose test item is '
                   'cold and warm separately.')
flags.DEFINE_enum('model', 'sasrec', ['sasrec'], 'Sequential model.')
flags.DEFINE_enum('size', 'paper', list(SIZES), 'paper: d=50, 2 blocks, 1 head; large: d=256, '
                  '4 blocks, 4 heads (each overridable below).')
flags.DEFINE_integer('maxlen', 200, 'Input window: the last N items of the history.')
flags.DEFINE_integer('hidden_units', None, 'Embedding / hidden size d (default: --size).')
flags.DEFINE_integer('num_blocks', None, 'Self-attention blocks (default: --size).')
flags.DEFINE_integer('num_heads', None, 'Attention heads, dividing d (default: --size).')
flags.DEFINE_float('dropout', 0.2, 'Dropout rate.')
flags.DEFINE_bool('positional', True, 'Learned positional embedding (False: the ablation).')
flags.DEFINE_enum('loss', 'bce', list(sasrec.LOSSES), 'bce: the paper\'s, one negative per '
                  'position; sampled_softmax: softmax over the next item and --num_negatives.')
flags.DEFINE_integer('num_negatives', None, 'Negatives per position (sampled_softmax; default 100).')
flags.DEFINE_float('learning_rate', 0.001, 'Adam learning rate.')
flags.DEFINE_integer('batch_size', 128, 'Sequences per step.')
flags.DEFINE_integer('epochs', 200, 'Epochs of num_users // batch_size steps.')
flags.DEFINE_integer('eval_every', 20, 'Evaluate every N epochs (and after the last).')
flags.DEFINE_integer('top_k', 10, 'K of HR@K / NDCG@K.')
flags.DEFINE_enum('item_text', 'none', list(sequential.ITEM_TEXT_MODES),
                  'Language-model item features (all-MiniLM-L6-v2 over title, year, genres and, '
                  'for ml-latest-small, tags): init = item table starts at their principal '
                  'components; input = item vector is a free row plus a learned projection '
                  '(gives untrained items a representation).')
flags.DEFINE_enum('training', 'central', ['central', 'fedavg'], 'Central training, or FedAvg '
                  'with one client per user.')
_FED = sequential_fedavg.FedSequentialConfig()
flags.DEFINE_integer('rounds', _FED.rounds, 'fedavg: rounds.')
flags.DEFINE_integer('clients_per_round', _FED.clients_per_round, 'fedavg: users per round.')
flags.DEFINE_integer('local_steps', _FED.local_steps, 'fedavg: client SGD steps per round.')
flags.DEFINE_float('client_learning_rate', _FED.client_learning_rate, 'fedavg: client SGD rate.')
flags.DEFINE_enum('server_optimizer', _FED.server_optimizer, ['adam', 'sgd'], 'fedavg: server '
                  'optimizer.')
flags.DEFINE_float('server_learning_rate', _FED.server_learning_rate, 'fedavg: server rate.')
flags.DEFINE_integer('eval_every_rounds', _FED.eval_every, 'fedavg: evaluate every N rounds.')
flags.DEFINE_string('export_base', None, 'Also export the best model for TF Serving as '
                    '<export_base>/<export_name>/<export_version> with a `recommend` signature '
                    '(recent item ids -> top-k items; tff_rec/export/sequential_serving.py).')
flags.DEFINE_string('export_name', 'sasrec', 'TF Serving model name of the export.')
flags.DEFINE_integer('export_version', 1, 'TF Serving version of the export.')
dp_flags.define_dp_flags()
common_flags.define_output_flags('sequential')
flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.')


def _config() -> sequential.SequentialConfig:
  """The run's configuration from the flags; UsageError names the flag."""
  for name in ('maxlen', 'epochs', 'eval_every', 'top_k', 'batch_size', 'eval_negatives'):
    common_flags._positive(name)  # pylint: disable=protected-access
  for name in ('hidden_units', 'num_blocks', 'num_heads', 'num_negatives'):
    common_flags._positive(name, allow_none=True)  # pylint: disable=protected-access
  if not 0.0 <= FLAGS.cold_items < 1.0:
    raise app.UsageError(f'--cold_items must be in [0, 1), got {FLAGS.cold_items}')
  if FLAGS.min_actions < 0:
    raise app.UsageError(f'--min_actions must be >= 0, got {FLAGS.min_actions}')
  if FLAGS.loss == 'bce' and FLAGS.num_negatives not in (None, 1):
    raise app.UsageError('--num_negatives applies to --loss=sampled_softmax (bce uses one)')
  if FLAGS.data_dir is not None and not os.path.exists(FLAGS.data_dir):
    raise app.UsageError(f'--data_dir={FLAGS.data_dir} does not exist')
  hparams = dict(SIZES[FLAGS.size], maxlen=FLAGS.maxlen, dropout=FLAGS.dropout,
                 positional=FLAGS.positional)
  for name in ('hidden_units', 'num_blocks', 'num_heads'):
    if FLAGS[name].value is not None:
      hparams[name] = FLAGS[name].value
  if hparams['hidden_units'] % hparams['num_heads']:
    raise app.UsageError(f'--num_heads={hparams["num_heads"]} must divide --hidden_units='
                         f'{hparams["hidden_units"]}')
  if not 0.0 <= FLAGS.dropout < 1.0:
    raise app.UsageError(f'--dropout must be in [0, 1), got {FLAGS.dropout}')
  negatives = 1 if FLAGS.loss == 'bce' else (FLAGS.num_negatives or 100)
  try:
    return sequential.SequentialConfig(
        model=FLAGS.model, hparams=hparams, loss=FLAGS.loss, num_negatives=negatives,
        learning_rate=FLAGS.learning_rate, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
        eval_every=FLAGS.eval_every, top_k=FLAGS.top_k, seed=FLAGS.seed,
        item_text=FLAGS.item_text, progress_bar=FLAGS.progress_bar)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


_FED_FLAGS = ('rounds', 'clients_per_round', 'local_steps', 'client_learning_rate',
              'server_optimizer', 'server_learning_rate', 'eval_every_rounds')


def _fed_config(central: sequential.SequentialConfig) -> sequential_fedavg.FedSequentialConfig:
  """The federated configuration; UsageError names the flag."""
  if FLAGS.training == 'central':
    given = [n for n in _FED_FLAGS if FLAGS[n].present]
    if given or FLAGS.dp != 'none':
      raise app.UsageError(f'--{given[0] if given else "dp"} needs --training=fedavg')
    return None
  for name in ('rounds', 'clients_per_round', 'local_steps', 'eval_every_rounds'):
    common_flags._positive(name)  # pylint: disable=protected-access
  for name in ('client_learning_rate', 'server_learning_rate'):
    if not FLAGS[name].value > 0:
      raise app.UsageError(f'--{name} must be > 0, got {FLAGS[name].value}')
  for name in ('epochs', 'eval_every', 'batch_size', 'learning_rate'):
    if FLAGS[name].present:
      raise app.UsageError(f'--{name} is a flag of --training=central')
  if FLAGS.secure_aggregation != 'none':
    raise app.UsageError(f'--secure_aggregation={FLAGS.secure_aggregation} is not available in '
                         'run_sequential')
  return sequential_fedavg.FedSequentialConfig(
      central=central, rounds=FLAGS.rounds, clients_per_round=FLAGS.clients_per_round,
      local_steps=FLAGS.local_steps, client_learning_rate=FLAGS.client_learning_rate,
      server_optimizer=FLAGS.server_optimizer, server_learning_rate=FLAGS.server_learning_rate,
      eval_every=FLAGS.eval_every_rounds)


def main(argv: Sequence[str]) -> None:
  del argv
  common_flags.quiet_logging()
  config = _config()
  fed = _fed_config(config)
  if FLAGS.export_base is not None:
    try:
      serving.check_version(FLAGS.export_base, FLAGS.export_name, FLAGS.export_version)
    except serving.ExportError as e:
      raise app.UsageError(f'--export_base/--export_name/--export_version: '
                           f'{str(e).split("; pass")[0]}') from e
  if fed is not None:
    dp_flags.dp_config_from_flags()  # Flag errors before any work.
  common_flags.check_output_dir(FLAGS.root_output_dir, FLAGS.experiment_name)
  run_dir = os.path.join(FLAGS.root_output_dir, FLAGS.experiment_name)
  if os.path.exists(os.path.join(run_dir, 'result.json')):
    raise app.UsageError(f'--experiment_name: {run_dir} already holds a finished run '
                         '(result.json); choose another name')
  try:
    ratings = data_setup.load_ratings(data_setup.DataConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, cache_dir=FLAGS.cache_dir, seed=FLAGS.seed))
    split = sequences.split_sequences(ratings, seed=FLAGS.seed, num_negatives=FLAGS.eval_negatives,
                                      min_actions=FLAGS.min_actions or None)
    if FLAGS.cold_items > 0:
      split = sequences.hold_out_items(split, fraction=FLAGS.cold_items, seed=FLAGS.seed)
    features = None
    if config.item_text != 'none':
      features = item_text_features.text_features(
          split, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, cache_dir=FLAGS.cache_dir)
  except (errors.DataError, ValueError) as e:
    raise app.UsageError(f'--dataset/--data_dir: {e}') from e
  except text_encoder.EncoderUnavailableError as e:
    raise app.UsageError(f'--item_text={config.item_text}: {e}') from e
  dp = None
  if fed is not None:
    dp = dp_flags.prepare_personalized_dp_for_run(
        dp_flags.dp_config_from_flags(), clients_per_round=fed.clients_per_round,
        population=sequential.TrainingSampler(split, config.maxlen).trainable_users,
        rounds=fed.rounds)
    if dp.total_rounds < fed.rounds:
      fed = dataclasses.replace(fed, rounds=dp.total_rounds)
    if dp.needs_secure_context:
      runtime.set_local_context(secure_intrinsics=True)
    else:
      runtime.ensure_context()
  os.makedirs(run_dir, exist_ok=True)
  with run_dir_lib.lock(run_dir):
    hparams = dict(dataset=FLAGS.dataset, min_actions=FLAGS.min_actions,
                   cold_items=FLAGS.cold_items, num_cold_items=int(split.cold_items.size),
                   eval_negatives=FLAGS.eval_negatives, size=FLAGS.size, training=FLAGS.training,
                   config=sequential.config_dict(config), data=split.summary())
    if fed is not None:
      hparams['federated'] = {f.name: getattr(fed, f.name) for f in dataclasses.fields(fed)
                              if f.name != 'central'}
      hparams['dp'] = dp.report() if dp.enabled else 'none (weighted mean)'
    atomic.write_json(os.path.join(run_dir, 'hparams.json'), hparams)
    history = []

    def on_eval(row):
      if dp is not None and dp.enabled:
        row['dp/epsilon'] = dp.epsilon_after(row['round'])
      history.append(row)
      atomic.write_json(os.path.join(run_dir, 'history.json'), history)

    if fed is None:
      result = sequential.train(config, split, item_text_features=features, on_eval=on_eval)
      when = ('best_epoch', result.best_epoch)
      summary = dict(hparams, best_epoch=result.best_epoch, valid=result.valid, test=result.test,
                     seconds_per_epoch=result.seconds_per_epoch,
                     num_parameters=result.num_parameters)
      if result.test_cold is not None:
        summary.update(test_cold=result.test_cold, test_warm=result.test_warm)
    else:
      result = sequential_fedavg.train(fed, split, item_text_features=features,
                                       model_aggregator=dp.aggregator, on_eval=on_eval)
      when = ('best_round', result.best_round)
      summary = dict(hparams, best_round=result.best_round, valid=result.valid, test=result.test,
                     seconds_per_round=result.seconds_per_round)
      if dp.enabled:
        summary['dp_epsilon'] = dp.epsilon_after(fed.rounds)
    if FLAGS.export_base is not None:
      exported = sequential_serving.export(
          result.model, split.item_index.raw_ids.tolist(), export_base=FLAGS.export_base,
          model_name=FLAGS.export_name, version=FLAGS.export_version)
      summary['export'] = exported.version_dir
    atomic.write_json(os.path.join(run_dir, 'result.json'), summary)
  k = config.top_k
  print(f'{run_dir}: {when[0].replace("_", " ")} {when[1]} by val HR@{k}: test HR@{k} '
        f'{result.test[f"hr@{k}"]:.4f}, NDCG@{k} {result.test[f"ndcg@{k}"]:.4f} (sampled); '
        f'{result.test[f"full_hr@{k}"]:.4f} / {result.test[f"full_ndcg@{k}"]:.4f} (full ranking)')
  if getattr(result, 'test_cold', None) is not None:
    print(f'  cold test items ({result.test_cold["users"]} users): HR@{k} '
          f'{result.test_cold[f"hr@{k}"]:.4f}, NDCG@{k} {result.test_cold[f"ndcg@{k}"]:.4f}; warm '
          f'({result.test_warm["users"]} users): {result.test_warm[f"hr@{k}"]:.4f} / '
          f'{result.test_warm[f"ndcg@{k}"]:.4f}')


if __name__ == '__main__':
  common_flags.run(main)
