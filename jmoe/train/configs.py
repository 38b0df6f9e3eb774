"""The experiment configs of the repository's `configs/` folder, loaded by name or path.

`load("digits_moe")` is the `get_config()` of `configs/digits_moe.py`, the file that
`python -m jmoe.train --config configs/digits_moe.py` reads, for notebooks and scripts that
call the training loop as a library.
"""

import importlib.util
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def available() -> list[str]:
    """Names of the config files in `CONFIG_DIR` (empty where jmoe was installed without
    its repository)."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))


def load(name_or_path: str):
    """The `get_config()` of `configs/<name>.py`, or of a config file at a path.

    Raises:
      FileNotFoundError: naming the file looked for and the configs that exist.
    """
    path = name_or_path
    if not name_or_path.endswith(".py"):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no config file {path!r}; configs in the repository: {available()}"
        )
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"jmoe_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


__all__ = ["CONFIG_DIR", "available", "load"]
