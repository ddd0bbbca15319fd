"""Fine-tuning of a model folder that is already compressed, as its own plans describe it.

    cp MODEL_FOLDER/plans.json $nnUNet_preprocessed/DATASET/PLANS_ft.json   # plans_name PLANS_ft, schedule added
    nnUNetv2_train D C F -p PLANS_ft -tr nnUNetTrainerFineTune -pretrained_weights MODEL_FOLDER/fold_F/checkpoint_final.pth

The plans of a compressed model folder (Tucker, pruned, or pruned then Tucker) name
nnunet_compress.network.CompressedUNet with the exact channel counts and ranks of its checkpoint, so the network
is built in its compressed shape and ``-pretrained_weights`` loads that checkpoint as it is; nothing is pruned or
decomposed again. Why a trainer of its own: the Tucker and pruning trainers compress while they train (or demand
plans of their method), while a chain of methods is fine-tuned here in one run. The schedule comes from the plans
(default 50 epochs at lr 1e-3), and plans with a distillation entry train towards a teacher's soft predictions.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_compress.nnunet.distillation_trainer import DistillationTrainerMixin
from nnunet_compress.nnunet.training import ScheduleFromPlansMixin, install_pretrained_weights_hook

install_pretrained_weights_hook()


class nnUNetTrainerFineTune(DistillationTrainerMixin, ScheduleFromPlansMixin, nnUNetTrainer):
    default_schedule = {"num_epochs": 50, "initial_lr": 1e-3}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_schedule_from_plans()
        self.setup_distillation()
