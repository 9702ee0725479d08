"""Classification subproject: ImageNet-style training, distillation and export for Meta-SpikeFormer."""
