"""Trains through the Python API and dumps this rank's final parameters (run under accelerate launch)."""

import os
import sys

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from dtrain import Config, Trainer

out = sys.argv[1]
torch.manual_seed(0)
x = torch.randn(256, 8)
y = x.sum(dim=1, keepdim=True)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
config = Config(output_dir=out)
config.train.max_steps = 12
config.eval.log_every_steps = 4
config.eval.eval_every_steps = 6
trainer = Trainer(config, model=model, loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                  train_dataloader=DataLoader(TensorDataset(x, y), batch_size=8),
                  eval_dataloader=DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8))
trainer.fit()
params = {k: v.detach().cpu().contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
save_file(params, os.path.join(out, f"params_rank{trainer.accelerator.process_index}.safetensors"))
