"""The DirMoE routing math under the name the HF modeling file imports.

`modeling_dirmoe.py` does ``from .dirmoe_routing import route`` so that the same file works in two
places: inside this package (this module re-exports :mod:`megatron_dirmoe.routing`) and inside an
exported checkpoint folder, where the converter writes ``megatron_dirmoe/routing.py`` verbatim as
``dirmoe_routing.py``. One source of truth, no copy in the repository.
"""

from megatron_dirmoe.routing import *  # noqa: F401,F403
from megatron_dirmoe.routing import __all__  # noqa: F401
