"""Where the modules of ``metahpo.estimators`` and ``metahpo.tasks`` live.

A wheel carries them inside the package (``metahpo/estimators/*.py``). A source checkout and an
editable install keep them in the repository's top-level ``estimators/`` and ``tasks/`` folders;
there, the subpackage's ``__path__`` also points at that folder. Nothing is ever imported under
a top-level ``tasks`` or ``estimators`` name, so a user's own ``tasks.py`` cannot shadow ours.
"""

from __future__ import annotations

from pathlib import Path


def extend_path(path: list[str], init_file: str, folder: str) -> list[str]:
    """``path`` plus the repository's ``folder`` when ``init_file`` is in a metahpo checkout."""
    root = Path(init_file).resolve().parents[2]
    project = root / "pyproject.toml"
    source = root / folder
    if source.is_dir() and project.is_file() and 'name = "metahpo"' in project.read_text():
        path.append(str(source))
    return path
