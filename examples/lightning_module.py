"""ADOPT in PyTorch Lightning: return it from ``configure_optimizers``.

pip install "adoptim[integrations]"   # Lightning (and transformers, accelerate)
python examples/lightning_module.py
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from adoptim import ADOPTW


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2, weight_decay: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = ADOPTW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(max_steps: int = 60) -> float:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = Regressor()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model.net(x), y).item()


if __name__ == "__main__":
    print(f"final loss {main():.4f} (initial about 10)")
