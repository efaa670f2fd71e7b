"""The built-in tasks: ``metahpo.tasks.digits``, ``metahpo.tasks.mnist`` and the others.

Their source lives in the repository's top-level ``tasks/`` folder (see metahpo/_source.py).
"""

from metahpo._source import extend_path

__path__ = extend_path(__path__, __file__, "tasks")
