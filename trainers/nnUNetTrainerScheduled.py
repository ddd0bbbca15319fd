"""nnU-Net's default trainer with epochs, iterations and learning rate taken from the plans.

Used for the tiny demo/test base model and for any run whose schedule should be recorded in its plans
(see nnunet_compress.nnunet.training.ScheduleFromPlansMixin). Without a compression section it is nnUNetTrainer.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_compress.nnunet.training import ScheduleFromPlansMixin


class nnUNetTrainerScheduled(ScheduleFromPlansMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_schedule_from_plans()
