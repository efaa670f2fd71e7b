"""Build hook: a wheel carries ``estimators/``, ``tasks/`` and ``configs/`` inside ``metahpo``.

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
    "configs": "metahpo/configs",
}


class MetahpoBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        root = Path(self.root)
        for folder, target in FOLDERS.items():
            for path in sorted((root / folder).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    rel = path.relative_to(root / folder).as_posix()
                    build_data["force_include"][str(path)] = f"{target}/{rel}"
