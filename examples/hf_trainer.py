"""ADOPT with the Hugging Face ``Trainer``: pass it (and a scheduler) as ``optimizers=``.

    pip install "adoptim[integrations]"   # transformers and accelerate (and Lightning)
    python examples/hf_trainer.py

A tiny regression model stands in for a transformer, so nothing is downloaded; with a real
model the optimizer line is the same.
"""

import tempfile

import torch
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

from adoptim import ADOPTW


class TinyRegressor(torch.nn.Module):
    """Any nn.Module whose forward returns a dict with "loss" works with Trainer."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
        )

    def forward(self, x, labels=None):
        pred = self.net(x)
        loss = None if labels is None else torch.nn.functional.mse_loss(pred, labels)
        return {"loss": loss, "logits": pred}


def main(max_steps: int = 60) -> float:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1)
    dataset = [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]
    model = TinyRegressor()

    opt = ADOPTW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=max_steps)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=max_steps,
            per_device_train_batch_size=32,
            use_cpu=True,
            save_strategy="no",
            report_to=[],
            logging_steps=20,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched))
        trainer.train()
    # Trainer used ours (accelerate wraps it; the wrapped optimizer is the same object).
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model.net(x), y).item()


if __name__ == "__main__":
    print(f"final loss {main():.4f} (initial about 10)")
