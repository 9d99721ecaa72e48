"""The NCM family under one import, as `models.registry` names it (`--model` -> class).

| `--model`  | class          | module        | MODELS.md |
|------------|----------------|---------------|-----------|
| `ncm-lr`   | SlateLogReg    | slatewise     | §3.3      |
| `ncm-gru`  | SlateGRU       | slatewise     | §3.3      |
| `ncm`      | NCM            | readout       | §3.4      |
| `ncm-adv`  | AdvNCM         | adversarial   | §3.5      |
| `scot`     | SCOT           | sessionwise   | §3.7      |
| `ncm-tgru` | TransformerGRU | sessionwise   | §3.8      |

RANCM (§3.6, optional) is not implemented.
"""

from models.ncm.adversarial import AdvNCM, AdvNCMConfig
from models.ncm.base import SlateConfig, SlateModel
from models.ncm.readout import NCM, NCMConfig
from models.ncm.sessionwise import SCOT, AttentionConfig, TransformerGRU
from models.ncm.slatewise import SlateGRU, SlateLogReg

__all__ = [
    "NCM",
    "SCOT",
    "AdvNCM",
    "AdvNCMConfig",
    "AttentionConfig",
    "NCMConfig",
    "SlateConfig",
    "SlateGRU",
    "SlateLogReg",
    "SlateModel",
    "TransformerGRU",
]
