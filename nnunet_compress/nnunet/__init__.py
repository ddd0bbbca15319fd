"""Everything that touches nnU-Net's files, classes and commands, kept thin.

Model folders and checkpoints (:mod:`.model_folder`, read safely, written atomically), plan modifiers that derive
compressed plans from a parent (:mod:`.plans`) and presets (:mod:`.presets`), nnU-Net's environment and commands
(:mod:`.env`), the trainer mixins that the classes in the top-level ``trainers/`` folder are made of
(:mod:`.training`, :mod:`.pruning_trainer`, :mod:`.distillation_trainer`, :mod:`.teacher`), calibration batches
through nnU-Net's preprocessor (:mod:`.calibration`), nnU-Net's predictor (:mod:`.predictions`) and synthetic CT
datasets in nnU-Net's raw format (:mod:`.synthetic`). May import the maths (tucker, pruning, distillation), the
inference engine and :mod:`nnunet_compress.network`; never the workflows, evaluation, TotalSegmentator, demo or
CLI.
"""
