"""`TrainConfig`'s sections: one dataclass per feature (launch, flow matching, LoRA, textual inversion,
DreamBooth, inpainting and masks, evaluation and sample grids), each with its options and its own checks.

`TrainConfig` (train/config.py) inherits them, so a setting stays one flat key: the flags and the recipe's
`train:` keys users know, and the `config` a checkpoint records, are unchanged. `check_section` of each
runs from `TrainConfig.check_more`, in `SECTIONS`' order, after every option's own type and bounds."""

from latentmill.train.settings.dreambooth import DreamBoothSettings
from latentmill.train.settings.evaluation import EvaluationSettings
from latentmill.train.settings.flowmatching import FlowMatchingSettings
from latentmill.train.settings.inpainting import InpaintingSettings
from latentmill.train.settings.launch import LaunchSettings
from latentmill.train.settings.lora import LoraSettings
from latentmill.train.settings.textualinversion import TextualInversionSettings

# the order their checks run in (and, reversed, the order of their options in `train --help`)
SECTIONS = (
    LaunchSettings,
    DreamBoothSettings,
    LoraSettings,
    TextualInversionSettings,
    InpaintingSettings,
    FlowMatchingSettings,
    EvaluationSettings,
)

__all__ = ["SECTIONS", *(section.__name__ for section in SECTIONS)]
