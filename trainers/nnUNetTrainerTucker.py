"""Fine-tuning of a Tucker-compressed nnU-Net network.

    nnunet-compress plan tucker -d D -c C --rank-ratio 0.3
    nnUNetv2_train D C F -p nnUNetPlans_tucker0.3 -tr nnUNetTrainerTucker -pretrained_weights base.pth

The plans name nnunet_compress.network.CompressedUNet with the Tucker ranks, so the network is built factorised;
`-pretrained_weights` (a checkpoint of the parent, uncompressed model) is decomposed into it — every layer,
segmentation heads included — before the first epoch. The fine-tuning schedule (default 50 epochs at a tenth of
nnU-Net's learning rate, as a fine-tune of an already trained model needs) comes from the plans. Plans made with
``--distill`` train it towards the parent's soft predictions as well (nnunet_compress.nnunet.distillation_trainer).
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_compress.nnunet.distillation_trainer import DistillationTrainerMixin
from nnunet_compress.nnunet.training import ScheduleFromPlansMixin, compression_section, install_pretrained_weights_hook

install_pretrained_weights_hook()


class nnUNetTrainerTucker(DistillationTrainerMixin, ScheduleFromPlansMixin, nnUNetTrainer):
    default_schedule = {"num_epochs": 50, "initial_lr": 1e-3}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        compression_section(self.configuration_manager, required_method="tucker")
        self.apply_schedule_from_plans()
        self.setup_distillation()
