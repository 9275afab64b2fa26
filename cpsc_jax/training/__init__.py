"""Parts shared by the distillation and the teacher trainers: the train state, augmentation,
evaluation, and the set-up of a run directory."""
