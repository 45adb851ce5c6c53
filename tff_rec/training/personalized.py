"""Personalized federated recommenders by name (PFedRec, FedRAP, FedMF, FedRecon), trained under the federated-NCF protocol.

  result = personalized.train(
      'pfedrec', data, hparams=pfedrec.PFedRecConfig(),
      loop=personalized_loop.LoopConfig(rounds=100, protocol='leak_free'),
      run_dir='runs/pfedrec')

Each algorithm is a TFF iterative process whose device state is threaded
through `personalized_loop` (see `pfedrec`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import tensorflow_federated as tff

from tff_rec.data import fedrec_protocol
from tff_rec.training import fedmf
from tff_rec.training import fedrap
from tff_rec.training import fedrecon_ncf
from tff_rec.training import personalized_loop
from tff_rec.training import pfedrec

ALGORITHMS = ('pfedrec', 'fedrap', 'fedmf', 'fedrecon')
HPARAMS = {'pfedrec': pfedrec.PFedRecConfig, 'fedrap': fedrap.FedRAPConfig,
           'fedmf': fedmf.FedMFConfig, 'fedrecon': fedrecon_ncf.FedReconConfig}
_MODULES = {'pfedrec': pfedrec, 'fedrap': fedrap, 'fedmf': fedmf, 'fedrecon': fedrecon_ncf}
_BUILDERS = {'pfedrec': pfedrec.build_pfedrec, 'fedrap': fedrap.build_fedrap,
             'fedmf': fedmf.build_fedmf, 'fedrecon': fedrecon_ncf.build_fedrecon}


def check_algorithm(name: str) -> str:
  if name not in ALGORITHMS:
    raise ValueError(f'unknown personalized algorithm {name!r}; valid: {", ".join(ALGORITHMS)}')
  return name


def train(algorithm: str, data: fedrec_protocol.FedRecData, *, hparams,
          loop: personalized_loop.LoopConfig, run_dir: str,
          model_aggregator: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
          aggregator_description: Any = 'uniform mean', progress: bool = True,
          round_metrics: Optional[Callable[[int], Mapping[str, float]]] = None
          ) -> personalized_loop.LoopResult:
  """Trains `algorithm` on `data` (or resumes it in `run_dir`).

  Args:
    algorithm: One of `ALGORITHMS`.
    data: The protocol's split (`fedrec_protocol.fedrec_split`).
    hparams: The algorithm's config (`HPARAMS[algorithm]`).
    loop: Rounds, participation, protocol and seed.
    run_dir: The run directory.
    model_aggregator: Aggregator of the shared part (default: uniform mean).
    aggregator_description: How the aggregator is recorded in the run's
      configuration (JSON-ready; a resume with another one is refused),
      e.g. a DP setup's `report()`.
    progress: Show a progress bar.
    round_metrics: `round -> {name: value}` recorded in each round's history
      row (e.g. `DpSetup.extra_metrics_fn`: the ε spent after the round).

  Returns:
    `personalized_loop.LoopResult`.
  """
  check_algorithm(algorithm)
  if not isinstance(hparams, HPARAMS[algorithm]):
    raise TypeError(f'{algorithm} takes {HPARAMS[algorithm].__name__}, got {type(hparams).__name__}')
  module = _MODULES[algorithm]
  build = _BUILDERS[algorithm]
  process = build(config=hparams, num_items=data.num_items, seed=loop.seed,
                  model_aggregator=model_aggregator)
  _, device0 = module.initial_values(hparams, data.num_items, loop.seed)
  description = dict(algorithm=algorithm, hparams=dataclasses.asdict(hparams),
                     aggregator=aggregator_description)
  return personalized_loop.run(process, initial_personal=device0, data=data, config=loop,
                               run_dir=run_dir, description=description, progress=progress,
                               round_metrics=round_metrics)
