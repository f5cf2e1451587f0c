"""User functions that a config names as "module:function" (a user reward rule, the evaluation's ground-truth
grader): found by import, never by executing text from the config, and checked at validation, so that a wrong
name fails before anything is loaded or compiled."""
from __future__ import annotations

import importlib
from typing import Callable


def load_function(path: str, setting: str) -> Callable:
    """The function named by `path` = "module:function"; `setting` names the config field in the error."""
    module_name, sep, name = path.partition(":")
    if not (sep and module_name and name):
        raise ValueError(f"{setting}={path!r} is not 'module:function'; name a function, e.g. 'my_pkg.rules:brevity'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{setting}={path!r}: module {module_name!r} does not import ({e}); fix the name or put "
                         "its folder on PYTHONPATH") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{setting}={path!r}: module {module_name!r} has no function {name!r}")
    return fn
