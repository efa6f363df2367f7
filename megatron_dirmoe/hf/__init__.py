"""Hugging Face `transformers` model code for DirMoE checkpoints.

Importing this package registers the model with the Auto classes, so
``AutoModelForCausalLM.from_pretrained(path)`` works for a converted folder without
``trust_remote_code`` when `megatron_dirmoe` is installed; the exported folder also carries this
code (configuration_dirmoe.py, modeling_dirmoe.py, dirmoe_routing.py) for
``trust_remote_code=True`` loading with only `transformers` and `torch`.

Files the converter copies into an export (source in this package -> name in the folder).
"""

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from megatron_dirmoe.hf.configuration_dirmoe import DirMoEHFConfig
from megatron_dirmoe.hf.modeling_dirmoe import (
    DirMoEForCausalLM,
    DirMoEModel,
    DirMoEPreTrainedModel,
)

__all__ = [
    "DirMoEHFConfig",
    "DirMoEForCausalLM",
    "DirMoEModel",
    "DirMoEPreTrainedModel",
    "EXPORTED_CODE_FILES",
    "AUTO_MAP",
]

_HERE = Path(__file__).resolve().parent
EXPORTED_CODE_FILES = {
    _HERE / "configuration_dirmoe.py": "configuration_dirmoe.py",
    _HERE / "modeling_dirmoe.py": "modeling_dirmoe.py",
    # The pure routing math, verbatim, under the name modeling_dirmoe.py imports.
    _HERE.parent / "routing.py": "dirmoe_routing.py",
}

# config.json's `auto_map`: which class in the exported code each Auto class loads.
AUTO_MAP = {
    "AutoConfig": "configuration_dirmoe.DirMoEHFConfig",
    "AutoModel": "modeling_dirmoe.DirMoEModel",
    "AutoModelForCausalLM": "modeling_dirmoe.DirMoEForCausalLM",
}

AutoConfig.register(DirMoEHFConfig.model_type, DirMoEHFConfig, exist_ok=True)
AutoModel.register(DirMoEHFConfig, DirMoEModel, exist_ok=True)
AutoModelForCausalLM.register(DirMoEHFConfig, DirMoEForCausalLM, exist_ok=True)
