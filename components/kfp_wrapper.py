"""The `@dsl.component` decorator every fineserve step uses."""

import os
from collections.abc import Callable

from kfp import dsl

from fineserve.defaults import component_image


def component(func: Callable) -> Callable:
    """A lightweight component on the project image, whose body imports the project.

    Inside a running step, KFP sets `_KFP_RUNTIME=true` and loads only its runtime (no
    `dsl.component`); there the module is imported for its plain functions, so the function is
    returned as it is. The image has kfp installed, so no `pip install kfp` at step start.
    """
    if os.environ.get("_KFP_RUNTIME") == "true":
        return func
    return dsl.component(base_image=component_image(), install_kfp_package=False)(func)
