"""Build hook: a wheel carries ``estimators/``, ``tasks/`` and ``docs/*.md`` inside ``metahpo``.

(``configs/`` comes in through the symlink ``metahpo/configs``, which also makes
``pkg://metahpo.configs`` work in a checkout.)

Only the wheel proper: an editable install maps ``metahpo`` alone onto the checkout (no copies,
no top-level ``tasks`` or ``estimators`` on ``sys.path``); ``metahpo/_source.py`` finds the
folders there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

FOLDERS = {
    "estimators": "metahpo/estimators",
    "tasks": "metahpo/tasks",
    "docs": "metahpo/docs",
}
# docs/: the Markdown pages only (its benchmark figures and run outputs stay in the repository)
ONLY = {"docs": "*.md"}


class MetahpoBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        root = Path(self.root)
        for folder, target in FOLDERS.items():
            for path in sorted((root / folder).rglob(ONLY.get(folder, "*"))):
                if folder in ONLY and path.parent != root / folder:
                    continue
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    rel = path.relative_to(root / folder).as_posix()
                    build_data["force_include"][str(path)] = f"{target}/{rel}"
