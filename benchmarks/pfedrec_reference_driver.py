# tff-rec: runs under another interpreter
"""Times PFedRec's reference PyTorch code (Zhangcx19/IJCAI-23-PFedRec) round by round, on CPU.

Run by benchmarks/pfedrec_speed.py under an interpreter that has torch,
pandas and tensorboardX (not the toolkit's environment; nothing here imports
tff_rec):

  python benchmarks/pfedrec_reference_driver.py --repo=<checkout> \\
      --dataset=ml-100k --rounds=3

The reference is used unmodified: its modules are imported from `--repo`,
its own `data/<dataset>/ratings.dat` is read and reindexed exactly as its
train.py does, and each round runs what train.py's loop runs
(`store_all_train_data`, `fed_train_a_round`, `fed_evaluate` on test and on
val). The changes are the device and a Python 3.11 shim (below): its code calls `.cuda()` even with
`use_cuda=False`, so `Tensor.cuda` and `Module.cuda` are made no-ops.
Prints one JSON line per round: the seconds of sampling, training and
evaluation, and the test / val HR@10.

Python 3.11 no longer accepts a set in `random.sample`, which the reference
calls on sets (data.py:80, :88); it was written for Python <= 3.10, whose
`random.sample` turned a set into a tuple first (with a deprecation
warning). The driver restores exactly that behaviour.
"""

import argparse
import json
import os
import sys
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repo', required=True)
  parser.add_argument('--dataset', default='ml-100k', choices=['ml-100k', 'ml-1m'])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  args = parser.parse_args()

  import numpy as np  # pylint: disable=g-import-not-at-top
  import pandas as pd  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  import random  # pylint: disable=g-import-not-at-top
  sample = random.sample

  def sample_like_python310(population, k, **kwargs):
    if isinstance(population, (set, frozenset)):
      population = tuple(population)
    return sample(population, k, **kwargs)

  random.sample = sample_like_python310
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.nn.Module.cuda = lambda self, *a, **k: self
  sys.path.insert(0, args.repo)
  os.chdir(args.repo)
  from data import SampleGenerator  # pylint: disable=g-import-not-at-top,import-error
  from mlp import MLPEngine  # pylint: disable=g-import-not-at-top,import-error

  sizes = {'ml-100k': (943, 1682), 'ml-1m': (6040, 3706)}[args.dataset]
  config = dict(clients_sample_ratio=1.0, clients_sample_num=0, num_round=args.rounds,
                local_epoch=1, lr_eta=80, batch_size=256, optimizer='sgd', lr=0.1,
                dataset=args.dataset, num_users=sizes[0], num_items=sizes[1], latent_dim=32,
                num_negative=4, l2_regularization=0.0, use_cuda=False, device_id=0)
  engine = MLPEngine(config)
  path = os.path.join('data', args.dataset, 'ratings.dat')
  sep = '::' if args.dataset == 'ml-1m' else ','
  rating = pd.read_csv(path, sep=sep, header=None, names=['uid', 'mid', 'rating', 'timestamp'],
                       engine='python')
  user_id = rating[['uid']].drop_duplicates().reindex()
  user_id['userId'] = np.arange(len(user_id))
  rating = pd.merge(rating, user_id, on=['uid'], how='left')
  item_id = rating[['mid']].drop_duplicates()
  item_id['itemId'] = np.arange(len(item_id))
  rating = pd.merge(rating, item_id, on=['mid'], how='left')
  rating = rating[['userId', 'itemId', 'rating', 'timestamp']]
  generator = SampleGenerator(ratings=rating)
  validate_data, test_data = generator.validate_data, generator.test_data
  for r in range(args.rounds):
    t0 = time.perf_counter()
    train_data = generator.store_all_train_data(config['num_negative'])
    t1 = time.perf_counter()
    engine.fed_train_a_round(train_data, round_id=r)
    t2 = time.perf_counter()
    test_hr, _, _ = engine.fed_evaluate(test_data)
    val_hr, _, _ = engine.fed_evaluate(validate_data)
    t3 = time.perf_counter()
    print(json.dumps(dict(round=r + 1, sample_seconds=t1 - t0, train_seconds=t2 - t1,
                          eval_seconds=t3 - t2, round_seconds=t3 - t0, test_hr=test_hr,
                          val_hr=val_hr, torch=torch.__version__,
                          threads=torch.get_num_threads())), flush=True)


if __name__ == '__main__':
  main()
