"""The built-in hypergradient estimators: ``metahpo.estimators.forward`` and the others.

Their source lives in the repository's top-level ``estimators/`` folder (see metahpo/_source.py).
"""

from metahpo._source import extend_path

__path__ = extend_path(__path__, __file__, "estimators")
